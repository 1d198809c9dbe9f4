"""The package's shape: stage packages layered one way, modules small, each says its one job.

The rules (docs/testing.md explains each exception):
- the stage packages are layered in LAYERS' order: a module imports only modules of its own
  package or of packages listed before it, never one after it;
- no import cycle, neither between modules nor between packages;
- no module over MAX_LINES lines; no function over MAX_FUNCTION_LINES lines in train/ and search/;
- packages up to train/ never import Ray (the loop runs in plain pytest; Ray stays at the edge);
- no re-exports: a package's __init__.py holds only its docstring;
- the entry points (`python -m tune_kd.<command>`: the top-level modules and __main__.py files) only
  call the cli package, and nothing imports them;
- every `module.name` the prose gives (docstrings, comments, the README, docs/) exists.
"""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tune_kd"
LAYERS = ["config", "data", "model", "kd", "teacher", "train", "results", "search", "cli"]
NO_RAY = LAYERS[:LAYERS.index("train") + 1]
MAX_LINES = 400
MAX_FUNCTION_LINES = 80
LONG_FUNCTION_PACKAGES = ("train", "search")
# function -> why it may run past MAX_FUNCTION_LINES (docs/testing.md lists the same)
LONG_FUNCTIONS: dict[str, str] = {}


def module_name(path: Path) -> str:
    """tune_kd/train/loop.py -> "train.loop"; tune_kd/search/__main__.py -> "search.__main__"."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def is_entry_point(module: str) -> bool:
    return "." not in module and module != "__init__" or module.endswith(".__main__")


def package_of(module: str) -> str:
    return "cli" if is_entry_point(module) else module.split(".")[0]


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The tune_kd modules a file imports anywhere in it (inside functions too)."""
    found = set()

    def add(dotted: str) -> None:
        name = dotted.removeprefix("tune_kd.")
        if name in modules:
            found.add(name)
        elif name.split(".")[0] in LAYERS:      # `from tune_kd.data import tokenized` names the package
            found.add(name)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tune_kd."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tune_kd"):
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                add(dotted if dotted.removeprefix("tune_kd.") in modules else node.module)
    return found


def module_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, modules) - {name} for name, path in paths.items()}


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, imported in graph.items():
        packages.setdefault(package_of(module), set()).update(package_of(m) for m in imported)
    return {p: found - {p} for p, found in packages.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (each reported once, from where it was entered)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """"a.x -> b.y" for every import of a package listed after the importer's own."""
    rank = {p: i for i, p in enumerate(LAYERS)}
    return [f"{m} -> {t}" for m, imported in sorted(graph.items()) for t in sorted(imported)
            if rank[package_of(t)] > rank[package_of(m)]]


def test_the_checks_find_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert upward_imports({"data.tokenized": {"config.errors", "train.loop"}}) == ["data.tokenized -> train.loop"]
    assert package_graph({"data.a": {"model.b"}, "model.b": {"data.c"}}) == {"data": {"model"}, "model": {"data"}}


def test_every_module_lives_in_a_stage_package_or_is_an_entry_point():
    for module in module_graph():
        assert package_of(module) in LAYERS or module == "__init__", module


def test_no_import_cycle_between_modules_or_packages():
    graph = module_graph()
    assert cycles(graph) == []
    assert cycles(package_graph(graph)) == []


def test_packages_import_only_the_ones_below_them():
    assert upward_imports(module_graph()) == []


def test_entry_points_only_call_the_cli_and_nothing_imports_them():
    graph = module_graph()
    for module, imported in graph.items():
        if is_entry_point(module):
            assert imported and all(m.startswith("cli.") for m in imported), f"{module} imports {imported}"
        assert not any(is_entry_point(m) for m in imported), f"{module} imports an entry point"


def test_packages_up_to_train_never_import_ray():
    for path in PACKAGE.rglob("*.py"):
        if package_of(module_name(path)) not in NO_RAY:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{module_name(path)} imports ray"


def test_package_inits_hold_only_a_docstring():
    for init in PACKAGE.rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), f"{init.relative_to(PACKAGE)} holds code"


def test_no_module_over_the_line_limit_and_each_says_its_job():
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{module_name(path)}: {lines} lines"
        assert ast.get_docstring(ast.parse(path.read_text())), f"{module_name(path)} has no docstring"


def test_no_long_function_in_train_and_search():
    long = {}
    for package in LONG_FUNCTION_PACKAGES:
        for path in (PACKAGE / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        long[f"{module_name(path)}.{node.name}"] = length
    assert set(long) <= set(LONG_FUNCTIONS), f"over {MAX_FUNCTION_LINES} lines: {long}"


def defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level (not the ones it imports)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_every_name_is_imported_from_where_it_is_defined():
    """No re-exports: `from tune_kd.x.y import name` only where y defines name (here, in the tests and
    in bench/), so a reader finds each thing where it lives."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    defined = {name: defined_names(path) for name, path in modules.items()}
    wrong = []
    for path in [*PACKAGE.rglob("*.py"), *PACKAGE.parent.joinpath("tests").rglob("*.py"),
                 *PACKAGE.parent.joinpath("bench").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tune_kd."):
                module = node.module.removeprefix("tune_kd.")
                for alias in node.names:
                    if module in defined and alias.name not in defined[module] \
                            and f"{module}.{alias.name}" not in modules:
                        wrong.append(f"{path.name}: {alias.name} from tune_kd.{module}")
    assert wrong == []


# ---- names the prose gives --------------------------------------------------------------------

# `module.name` in prose: a module (or package/module) and what it defines; also YAML keys (`train.alpha`)
PROSE_REFERENCE = re.compile(r"(?<![\w./-])((?:[a-z_][a-z0-9_]*/)?[a-z_][a-z0-9_]*)\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?")
FILE_SUFFIXES = {"py", "json", "jsonl", "yaml", "yml", "csv", "png", "html", "md", "txt", "npy", "bin", "jinja", "whl",
                 "sh", "toml", "pt", "safetensors", "log", "parquet", "svg", "db"}
# heads that are other libraries or a variable, never one of tune_kd's modules
OUTSIDE = {"torch", "np", "F", "ray", "tune", "tuner", "matplotlib", "optuna", "transformers", "cfg", "self", "os", "sys"}


def yaml_sections() -> dict[str, set[str]]:
    """section -> its keys (ExperimentConfig's dataclass fields, and the old keys that still read)."""
    import dataclasses
    import typing

    from tune_kd.config.experiment import ExperimentConfig
    from tune_kd.config.stages import OLD_KEYS

    sections = {}
    for name, hint in typing.get_type_hints(ExperimentConfig).items():
        kind = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
        if dataclasses.is_dataclass(kind):
            sections[name] = {f.name for f in dataclasses.fields(kind)} | set(OLD_KEYS.get(name, {}))
    return sections


def wrong_references(text: str, modules: dict[str, list[str]], sections: dict[str, set[str]],
                     defined: set[str]) -> list[str]:
    """The `module.name` references in text that name nothing: the module (by its file's stem, or
    package/stem) lacks the name, or a YAML section lacks the key; a head that is neither (another
    library, a variable) counts only when the name it gives is one of tune_kd's (a module renamed)."""
    import importlib
    import importlib.util

    def has(owner, name: str) -> bool:
        return hasattr(owner, name) or name in getattr(owner, "__dataclass_fields__", {})

    wrong = []
    for match in PROSE_REFERENCE.finditer(text):
        head, name, member = match.groups()
        package, _, stem = head.rpartition("/")
        if name in FILE_SUFFIXES or head in OUTSIDE or re.match(r"\.\d", text[match.end():]):
            continue                                   # a file, another library, a weight name (model.layers.3)
        if head == "tune_kd":
            if importlib.util.find_spec(f"tune_kd.{name}") is None:
                wrong.append(match.group(0))
            continue
        candidates = [m for m in modules.get(stem, []) if not package or m.split(".")[0] == package]
        found = not package and name in sections.get(stem, set())
        for dotted in candidates:
            module = importlib.import_module(f"tune_kd.{dotted}")
            if has(module, name):
                owner = getattr(module, name, None)
                found = found or member is None or not isinstance(owner, type) or has(owner, member)
            elif hasattr(module, "__path__") and importlib.util.find_spec(f"tune_kd.{dotted}.{name}"):
                found = True
        if not found and (candidates or (not package and stem in sections) or name in defined):
            wrong.append(match.group(0))
    return wrong


def test_every_module_name_the_docstrings_comments_readme_and_docs_give_exists():
    """A docstring, comment, README or docs/ page that names `module.name` (or `package/module.name`,
    or a YAML key `section.key`) names something that exists: a rename that left prose behind fails
    here."""
    import importlib

    modules: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        dotted = module_name(path).removesuffix(".__init__").removesuffix("__init__")
        if dotted:
            modules.setdefault(dotted.split(".")[-1], []).append(dotted)
    sections = yaml_sections()
    defined = set().union(*(vars(importlib.import_module(f"tune_kd.{m}")) for ms in modules.values() for m in ms))
    root = PACKAGE.parent
    texts = [(str(doc.relative_to(root)), doc.read_text()) for doc in [root / "README.md", *root.joinpath("docs").glob("*.md")]]
    for path in [*PACKAGE.rglob("*.py"), *root.joinpath("bench").rglob("*.py")]:
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    texts.append((f"{path.relative_to(root)}:{getattr(node, 'lineno', 1)}", doc))
        texts += [(f"{path.relative_to(root)}:{i}", line.split("#", 1)[1])
                  for i, line in enumerate(source.splitlines(), 1) if "#" in line]
    wrong = [f"{where}: {ref}" for where, text in texts for ref in wrong_references(text, modules, sections, defined)]
    assert wrong == []
