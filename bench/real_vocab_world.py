"""A realistic large-vocabulary world: what a new user distilling Qwen2.5 has, built offline, and
the search run on it with its wall time and memory measured.

The world (under --world, default results/real-vocab-world/, git-ignored):

    tokenizer/             a copy of Qwen2.5's tokenizer (../shared/tokenizers/qwen2.5: the real
                           151,646-token byte-level BPE, ChatML with Qwen's default system prompt)
    data/train.jsonl       English and Chinese chat conversations, `messages` layout, seeded
    data/val.jsonl         (default 2,000 + 200): arithmetic asked in English or Chinese, reversing
                           or sorting a digit string, numbers between Arabic digits and Chinese
                           numerals, English <-> Chinese word look-ups from a small dictionary in
                           this file; 20% with a system turn, 20% with 2-3 question/answer turns;
                           replies of 1 to 12 tokens (5 on average), each form of question answered
                           in one form only, so exact match (val_acc) is learnable and means something
    teacher/               Qwen2ForCausalLM, hidden 128 x 4 layers, 4 heads, 2 kv heads, intermediate
                           384, 151,936 embedding rows (Qwen2.5's padding; len(tokenizer) is 151,646),
                           tied embeddings; trained on data/train.jsonl by tune_kd's own loop
                           (loop.train with this directory as the student, alpha 1 = plain SFT,
                           no teacher cache, float32 on CPU) and saved by checkpoint.save_student
    student/               Qwen2ForCausalLM, hidden 64 x 2 layers, 4 heads, 2 kv heads, intermediate 192,
                           same vocabulary rows, freshly initialised, shipping the tokenizer files
                           as a Hub Qwen checkpoint does
    kd.yaml                the experiment: the embedded default's search (learning_rate,
                           temperature, alpha as in search_spaces/kd.yaml, ASHA as there) on this
                           world, search.num_samples 4, train.epochs 2, both control arms on,
                           teacher_cache left at auto (off with --cache-off)
    cache/                 data.cache_dir (tokenized data, teacher cache)
    results/               the search's --storage (results/real-vocab-world/ inside it)
    world.json             the build's settings and the teacher's final metrics

Commands (from the repository root):

    python bench/real_vocab_world.py build     # the world and kd.yaml; cached: rebuilt when a build flag changes
    python bench/real_vocab_world.py search    # rewrite kd.yaml from the search flags, run the search, measure
    python bench/real_vocab_world.py all       # build, then search
    # the tiny check: --conversations 200 --val 40 --teacher-epochs 1 --num-samples 2 --epochs 1
    python bench/real_vocab_world.py --smoke   # seconds, no search: a toy world (a small ChatML BPE in
                                               # place of Qwen2.5's, 512 vocabulary rows, tiny models) built in
                                               # a scratch folder, its kd.yaml written and loaded by tune_kd's
                                               # config loader, the teacher's greedy reply generated (tests/bench)
    # flags: --tokenizer DIR (default ../shared/tokenizers/qwen2.5), --world DIR, --seed, --teacher-*/--student-*
    #        (hidden, layers, heads, kv-heads, intermediate), --teacher-lr, --teacher-batch-size, --cache-off,
    #        --set KEY=VALUE (a kd.yaml key, dotted, repeatable: the hand-set arms, e.g. --set teacher_server=off)
    # the flat teacher of docs/performance.md: build --world W --teacher-epochs 1

`search` runs, as a subprocess from the repository root,

    python -m tune_kd.search --space <world>/kd.yaml --storage <world>/results [--overwrite]

(--overwrite only when the experiment folder is already there: tune_kd moves it aside, never deletes
it) with RAY_TMPDIR set to a fresh /tmp/rvw-* folder, so every Ray process of this search names it.

Memory rule: every ~0.5 s a sampler thread of this script reads /proc/<pid>/smaps_rollup of each
process in the set = the process tree rooted at the search subprocess (driver, Ray's gcs, raylet,
dashboard, workers, trial processes, ingestion workers) UNION every process whose command line
mentions this search's RAY_TMPDIR (Ray processes that reparented away), never this script's own
process. (Not "everything started since": other developers' processes on a shared machine run as
the same user.) Pages shared with processes outside the set count for the set's share only.

The figures printed at the end, one `name: value` line each:

    search exit code                 the subprocess's exit status (0: the search, its controls and report ran)
    search wall seconds              subprocess start to exit: preparation, teacher cache, trials, export,
                                     control arms and report, Ray's start and stop included
    peak PSS all processes GB        the largest sum of PSS over the set in one sample (GB = 1e9 bytes)
    peak PSS largest process GB      the largest PSS any single process of the set reached in any sample
    largest process                  its program and pid (its command line's first word: Ray names a
                                     trial's process ray::<trainable>)
    processes at peak                how many processes the set held in the sample of the first figure
    processes seen                   distinct processes seen in the set over the whole search
    processes found only by RAY_TMPDIR   of those, the ones outside the subprocess's tree
    best val_ce                      best.json's best_val_ce: the best trial at its best epoch
    best trial                       its trial id
    best val_acc                     best.json's val_acc (the trial's last epoch)
    plain_sft val_ce                 controls.json: the plain-SFT arm (best settings, alpha 1) at its best epoch
    minimind_defaults val_ce         controls.json: MiniMind's defaults arm at its best epoch
    best minus plain_sft val_ce      negative: distillation beat plain SFT on val_ce
    teacher val_ce, teacher val_acc  the teacher's last epoch (world.json)
    exported student class           the class transformers.AutoModelForCausalLM loads from best_student/
    exported vocab rows              its embedding rows (151936 expected)
    reply matches reference          whether the reloaded student's greedy reply to the first validation
                                     prompt equals the data's answer (the reply itself is printed above)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAME = "real-vocab-world"
PADDED_VOCAB = 151_936           # Qwen2.5's embedding rows; the tokenizer emits 151,646 ids
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SAMPLE_SECONDS = 0.5

# ----------------------------------------------------------------------------------------------
# The data: checkable tasks asked in English or Chinese
# ----------------------------------------------------------------------------------------------

DICTIONARY = {"apple": "苹果", "water": "水", "book": "书", "cat": "猫", "dog": "狗", "sun": "太阳",
              "moon": "月亮", "tree": "树", "house": "房子", "school": "学校", "teacher": "老师",
              "student": "学生", "friend": "朋友", "rice": "米饭", "tea": "茶", "red": "红色", "blue": "蓝色",
              "green": "绿色", "big": "大", "small": "小", "hello": "你好", "thank you": "谢谢",
              "morning": "早上", "night": "晚上", "city": "城市", "river": "河", "mountain": "山",
              "flower": "花", "bird": "鸟", "fish": "鱼", "car": "汽车", "train": "火车", "computer": "电脑",
              "phone": "手机", "music": "音乐", "family": "家庭", "time": "时间", "money": "钱", "door": "门",
              "window": "窗户"}
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
                  "You are a bilingual English-Chinese tutor.", "你是一个乐于助人的助手。", "你是一名中英双语老师，请简洁回答。")
OPS = {"+": ("plus", "加", lambda a, b: a + b), "-": ("minus", "减", lambda a, b: a - b),
       "*": ("times", "乘以", lambda a, b: a * b)}
ZH_DIGITS = "零一二三四五六七八九"


def chinese_numeral(n: int) -> str:
    """0 <= n <= 9999 in Chinese numerals: 10 十, 15 十五, 105 一百零五, 110 一百一十, 1005 一千零五."""
    if n < 10:
        return ZH_DIGITS[n]
    if n < 20:
        return "十" + (ZH_DIGITS[n % 10] if n % 10 else "")
    out, zero = "", False
    for value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        digit = n // value % 10
        if digit:
            out += ("零" if zero and out else "") + ZH_DIGITS[digit] + unit
            zero = False
        else:
            zero = True
    return out


def question(rng: random.Random) -> tuple[str, str]:
    """One (question, reply): the task and language drawn from rng; each question form has one reply form."""
    task, zh = rng.choice(("arithmetic", "reverse", "sort", "numeral", "dictionary")), rng.random() < 0.5
    form = rng.randrange(2)
    if task == "arithmetic":
        op = rng.choice(sorted(OPS))
        word, zh_word, fn = OPS[op]
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(0, 99), rng.randint(0, 99))
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        r, shown = fn(a, b), "×" if op == "*" else op
        if zh:
            return ((f"{a}{zh_word}{b}等于多少？", f"{a}{zh_word}{b}等于{r}。") if form == 0 else
                    (f"请计算{a}{shown}{b}。", str(r)))
        return (f"What is {a} {word} {b}?", str(r)) if form == 0 else (f"Compute {a} {shown} {b}.", f"{a} {shown} {b} = {r}")
    if task in ("reverse", "sort"):
        s = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8)))
        answer = s[::-1] if task == "reverse" else "".join(sorted(s))
        if task == "reverse":
            return (f"把{s}倒过来写。" if zh else f"Reverse the digits {s}.", answer)
        return (f"把{s}的各位数字从小到大排列。" if zh else f"Sort the digits of {s} in ascending order.", answer)
    if task == "numeral":
        n = rng.randint(0, 999)
        if form == 0:
            return (f"{n}用汉字怎么写？" if zh else f"Write {n} in Chinese numerals.", chinese_numeral(n))
        return (f"{chinese_numeral(n)}是多少？请用阿拉伯数字回答。" if zh else
                f"What number is {chinese_numeral(n)}? Answer in digits.", str(n))
    en = rng.choice(sorted(DICTIONARY))
    cn = DICTIONARY[en]
    if form == 0:
        if zh:
            return f"“{en}”的中文是什么？", cn
        return f'What is the Chinese word for "{en}"?', f'"{en}" in Chinese is {cn}.'
    return (f"“{cn}”用英语怎么说？", f"“{cn}”的英文是{en}。") if zh else (f"Translate to English: {cn}", en)


def make_conversations(count: int, seed: int) -> list[dict]:
    """`count` conversations in the messages layout: 20% open with a system turn, 20% hold 2-3 turns."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.2 else []
        for _ in range(rng.randint(2, 3) if rng.random() < 0.2 else 1):
            asked, reply = question(rng)
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": reply}]
        out.append({"messages": messages})
    return out


# ----------------------------------------------------------------------------------------------
# The models and the world
# ----------------------------------------------------------------------------------------------

def qwen2(arch: dict, seed: int, tokenizer):
    """A freshly initialised Qwen2ForCausalLM of Qwen2.5's shape (padded vocab, tied embeddings); its
    bos/eos are the tokenizer's <|endoftext|> and <|im_end|> (Qwen2.5's 151643 and 151645)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=PADDED_VOCAB, hidden_size=arch["hidden"], num_hidden_layers=arch["layers"],
                         num_attention_heads=arch["heads"], num_key_value_heads=arch["kv_heads"],
                         intermediate_size=arch["intermediate"], tie_word_embeddings=True, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, rms_norm_eps=1e-6,
                         bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return Qwen2ForCausalLM(config)


def save_model(model, directory: Path, tokenizer_dir: Path) -> None:
    """save_pretrained (safetensors) plus the tokenizer files, as a Hub checkpoint ships them."""
    model.save_pretrained(str(directory), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, directory / name)


def max_tokens(paths: list[Path], tokenizer) -> int:
    """The longest rendered conversation in tokens."""
    longest = 0
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            text = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
            longest = max(longest, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return longest


def build_settings(args) -> dict:
    keys = ("hidden", "layers", "heads", "kv_heads", "intermediate")
    arch = lambda role: {k: getattr(args, f"{role}_{k}") for k in keys}  # noqa: E731
    return {"seed": args.seed, "conversations": args.conversations, "val": args.val, "teacher": arch("teacher"),
            "student": arch("student"), "teacher_epochs": args.teacher_epochs, "teacher_lr": args.teacher_lr,
            "teacher_batch_size": args.teacher_batch_size, "tokenizer": str(Path(args.tokenizer).resolve())}


def build(args, world: Path) -> dict:
    """Build the world unless world.json records the same settings; returns world.json's content."""
    settings = build_settings(args)
    record = world / "world.json"
    if record.is_file() and json.loads(record.read_text()).get("settings") == settings:
        print(f"world: up to date in {world} (delete world.json to rebuild)")
        return json.loads(record.read_text())
    from transformers import AutoTokenizer

    from tune_kd.config.experiment import load_config
    from tune_kd.model.checkpoint import save_student
    from tune_kd.model.hardware import quiet_progress_bars
    from tune_kd.train.loop import train

    quiet_progress_bars()
    started = time.perf_counter()
    for part in ("tokenizer", "data", "teacher", "student"):     # this script's own products
        shutil.rmtree(world / part, ignore_errors=True)
    record.unlink(missing_ok=True)
    (world / "tokenizer").mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(args.tokenizer) / name, world / "tokenizer" / name)
    tokenizer = AutoTokenizer.from_pretrained(str(world / "tokenizer"))
    train_path, val_path = world / "data" / "train.jsonl", world / "data" / "val.jsonl"
    train_path.parent.mkdir(parents=True)
    for path, count, seed in ((train_path, args.conversations, args.seed), (val_path, args.val, args.seed + 1)):
        # raw UTF-8, as a user's Chinese data is (not \u escapes)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_conversations(count, seed)),
                        encoding="utf-8")
    longest = max_tokens([train_path, val_path], tokenizer)
    max_seq_len = -(-longest // 32) * 32
    print(f"world: {args.conversations} + {args.val} conversations, longest {longest} tokens -> max_seq_len {max_seq_len}")
    save_model(qwen2(settings["student"], args.seed + 2, tokenizer), world / "student", world / "tokenizer")
    save_model(qwen2(settings["teacher"], args.seed + 3, tokenizer), world / "teacher", world / "tokenizer")
    raw = {"name": f"{NAME}-teacher", "tokenizer": str(world / "tokenizer"), "teacher": None,
           "student": {"path": str(world / "teacher")},
           "data": {"path": str(train_path), "val_path": str(val_path), "max_seq_len": max_seq_len,
                    "cache_dir": str(world / "cache")},
           "train": {"epochs": args.teacher_epochs, "batch_size": args.teacher_batch_size,
                     "learning_rate": args.teacher_lr, "warmup_iters": 20, "alpha": 1.0, "dtype": "float32",
                     "device": "cpu", "log_interval": 20, "seed": 0},
           "teacher_cache": "off", "logging": {"tensorboard": False}}
    print(f"world: training the teacher {settings['teacher']} for {args.teacher_epochs} epoch(s)")
    result = train(load_config(raw=raw))
    save_student(result.student, result.tokenizer, world / "teacher")
    document = {"settings": settings, "max_seq_len": max_seq_len, "longest_conversation_tokens": longest,
                "teacher_metrics": result.metrics, "build_seconds": round(time.perf_counter() - started, 1)}
    record.write_text(json.dumps(document, indent=1))
    print(f"world: teacher val_ce {result.metrics['val_ce']:.4f}, val_acc {result.metrics['val_acc']:.3f}; "
          f"built in {document['build_seconds']:.0f} s -> {world}")
    return document


def write_experiment(args, world: Path, max_seq_len: int) -> Path:
    """<world>/kd.yaml: the embedded default's search on this world."""
    q = json.dumps   # a JSON string is a YAML string: paths with any character stay one scalar
    path = world / "kd.yaml"
    path.write_text(f"""\
# The embedded default's search on a large-vocabulary world (bench/real_vocab_world.py wrote this file).
# Run: python -m tune_kd.search --space {world}/kd.yaml --storage {world}/results
name: {NAME}
teacher: {{path: {q(str(world / "teacher"))}}}
student: {{path: {q(str(world / "student"))}}}
data: {{path: {q(str(world / "data/train.jsonl"))}, val_path: {q(str(world / "data/val.jsonl"))},
       max_seq_len: {max_seq_len}, cache_dir: {q(str(world / "cache"))}}}
train: {{epochs: {args.epochs}, batch_size: 64, accumulation_steps: 1, grad_clip: 1.0, dtype: bfloat16,
        warmup_iters: 10, learning_rate: 3.0e-3, alpha: 0.5, temperature: 2.0, log_interval: 50}}
parameters:
  learning_rate: {{distribution: log_uniform_values, min: 5.0e-4, max: 1.0e-2}}
  temperature:   {{distribution: uniform, min: 1.0, max: 5.0}}
  alpha:         {{distribution: uniform, min: 0.0, max: 1.0}}
metric: {{name: val_ce, goal: minimize}}
search: {{algorithm: optuna, num_samples: {args.num_samples}, max_concurrent: auto, seed: 0, max_failures: 2}}
scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}   # time unit: epochs
resources: {{cpu_per_trial: 1, gpu_per_trial: auto}}
checkpoint: {{keep_per_trial: 1}}
controls: {{plain_sft: true, minimind_defaults: true}}
logging: {{wandb: false, wandb_project: tune-kd, tensorboard: true}}
""" + ("teacher_cache: off\n" if args.cache_off else ""), encoding="utf-8")
    if args.set:
        apply_overrides(path, args.set)
    return path


def apply_overrides(path: Path, overrides: list[str]) -> None:
    """--set KEY=VALUE (dotted key, YAML value), in order, on the experiment file: the hand-set
    choices a comparison runs (teacher_server=off, teacher_cache.top_k=65536, controls.seeds=0, ...)."""
    import yaml

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for override in overrides:
        key, _, value = override.partition("=")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            if not isinstance(node.get(part), dict):   # `teacher_server: off` style shorthands become a section
                node[part] = {} if node.get(part) is None else {"mode": node[part]}
            node = node[part]
        # on / off stay words: tune_kd's YAML reads them as modes, PyYAML as booleans
        node[leaf] = value if value in ("on", "off") else yaml.safe_load(value)
    path.write_text("# bench/real_vocab_world.py wrote this file, with --set " + " ".join(overrides) + "\n"
                    + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Measuring the search
# ----------------------------------------------------------------------------------------------

def read_proc(pid: int, name: str) -> str | None:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as handle:
            return handle.read().decode(errors="replace")
    except OSError:
        return None


class PssSampler(threading.Thread):
    """Samples the PSS of the process tree under `root` plus every process naming `marker` (see the
    module docstring), never this process."""

    def __init__(self, root: int, marker: str):
        super().__init__(daemon=True)
        self.root, self.marker, self.stop = root, marker, threading.Event()
        self.peak_total, self.peak_count, self.peak_single, self.single_name = 0, 0, 0, ""
        self.seen: set[int] = set()
        self.outside_tree: set[int] = set()   # found by the RAY_TMPDIR rule only

    def members(self) -> set[int]:
        children, named = {}, set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            stat = read_proc(pid, "stat")
            if stat is None:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(pid)
            if self.marker in (read_proc(pid, "cmdline") or ""):
                named.add(pid)
        tree, stack = set(), [self.root]
        while stack:
            pid = stack.pop()
            tree.add(pid)
            stack.extend(children.get(pid, []))
        self.outside_tree |= named - tree
        return (tree | named) - {os.getpid()}

    def sample(self) -> None:
        total, count = 0, 0
        for pid in self.members():
            rollup = read_proc(pid, "smaps_rollup")
            pss = next((int(line.split()[1]) * 1024 for line in (rollup or "").splitlines() if line.startswith("Pss:")), None)
            if pss is None:
                continue
            total, count = total + pss, count + 1
            self.seen.add(pid)
            if pss > self.peak_single:
                self.peak_single = pss
                program = (read_proc(pid, "cmdline") or "?").split("\0")[0][:60]
                self.single_name = f"{program} (pid {pid})"
        if total > self.peak_total:
            self.peak_total, self.peak_count = total, count

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(SAMPLE_SECONDS)


def generate(model_dir: Path, messages: list[dict], max_new_tokens: int = 48) -> tuple[str, object]:
    """A greedy reply from the model directory (AutoModelForCausalLM + AutoTokenizer) to `messages`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tune_kd.model.hardware import quiet_progress_bars

    quiet_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip(), model


def search(args, world: Path) -> int:
    """Run the search in a subprocess while sampling its memory; print the figures."""
    record = world / "world.json"
    if not record.is_file():
        print(f"error: no world in {world} (world.json missing): run `python bench/real_vocab_world.py build` first",
              file=sys.stderr)
        return 2
    built = json.loads(record.read_text())
    space = write_experiment(args, world, built["max_seq_len"])
    experiment_dir = world / "results" / NAME
    command = [sys.executable, "-m", "tune_kd.search", "--space", str(space), "--storage", str(world / "results")]
    if experiment_dir.exists():
        command.append("--overwrite")
    ray_tmp = tempfile.mkdtemp(prefix="rvw-", dir="/tmp")   # short: Ray's socket paths must stay < 108 bytes
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))   # this checkout's tune_kd
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONPATH=path)
    print("search: " + " ".join(command) + f"  (RAY_TMPDIR={ray_tmp})", flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    sampler = PssSampler(process.pid, ray_tmp)
    sampler.start()
    code = process.wait()
    wall = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    if code == 0:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    else:
        print(f"search failed (exit code {code}); Ray's logs are kept in {ray_tmp}")

    figures = {"search exit code": code, "search wall seconds": f"{wall:.1f}",
               "peak PSS all processes GB": f"{sampler.peak_total / 1e9:.2f}",
               "peak PSS largest process GB": f"{sampler.peak_single / 1e9:.2f}",
               "largest process": sampler.single_name or "n/a", "processes at peak": sampler.peak_count,
               "processes seen": len(sampler.seen),
               "processes found only by RAY_TMPDIR": len(sampler.outside_tree & sampler.seen)}
    best_file, controls_file = experiment_dir / "best.json", experiment_dir / "controls.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else {}
    arms = json.loads(controls_file.read_text())["arms"] if controls_file.is_file() else {}
    sft = arms.get("plain_sft", {}).get("value")
    figures.update({"best val_ce": f"{best['best_val_ce']:.4f}" if best else "n/a", "best trial": best.get("trial_id", "n/a"),
                    "best val_acc": f"{best['val_acc']:.3f}" if best else "n/a",
                    "plain_sft val_ce": f"{sft:.4f}" if sft is not None else "n/a",
                    "minimind_defaults val_ce": (f"{arms['minimind_defaults']['value']:.4f}"
                                                 if arms.get("minimind_defaults", {}).get("value") is not None else "n/a"),
                    "best minus plain_sft val_ce": f"{best['best_val_ce'] - sft:+.4f}" if best and sft is not None else "n/a",
                    "teacher val_ce": f"{built['teacher_metrics']['val_ce']:.4f}",
                    "teacher val_acc": f"{built['teacher_metrics']['val_acc']:.3f}"})
    export_dir = experiment_dir / "best_student"
    if (export_dir / "config.json").is_file():
        first = json.loads((world / "data" / "val.jsonl").read_text(encoding="utf-8").splitlines()[0])["messages"]
        turn = next(i for i, m in enumerate(first) if m["role"] == "assistant")
        prompt, reference = first[:turn], first[turn]["content"]
        reply, model = generate(export_dir, prompt)
        teacher_reply, _ = generate(world / "teacher", prompt)
        print(f"validation prompt: {json.dumps(prompt, ensure_ascii=False)}")
        for who, text in (("reference reply", reference), ("best student", reply), ("teacher", teacher_reply)):
            print(f"{who + ':':<18} {text[:120]!r}" + (f" ... ({len(text)} characters)" if len(text) > 120 else ""))
        figures.update({"exported student class": type(model).__name__,
                        "exported vocab rows": model.get_input_embeddings().weight.shape[0],
                        "reply matches reference": reply == reference})
    else:
        figures.update({"exported student class": "n/a (no best_student/)", "exported vocab rows": "n/a",
                        "reply matches reference": "n/a"})
    print()
    for name, value in figures.items():
        print(f"{name}: {value}")
    return code


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=("build", "search", "all"), help="(none with --smoke)")
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "tokenizers" / "qwen2.5"),
                        help="Qwen2.5's tokenizer directory (default: ../shared/tokenizers/qwen2.5 from the repo root)")
    parser.add_argument("--world", default=str(ROOT / "results" / NAME), help="the world's folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    parser.add_argument("--conversations", type=int, default=2000, help="training conversations")
    parser.add_argument("--val", type=int, default=200, help="validation conversations")
    for role, sizes in (("teacher", (128, 4, 4, 2, 384)), ("student", (64, 2, 4, 2, 192))):
        for key, default in zip(("hidden", "layers", "heads", "kv-heads", "intermediate"), sizes):
            parser.add_argument(f"--{role}-{key}", type=int, default=default, help=f"{role} {key} (default: %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, default=8, help="epochs of the teacher's SFT")
    parser.add_argument("--teacher-lr", type=float, default=3e-3, help="the teacher's learning rate")
    parser.add_argument("--teacher-batch-size", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=4, help="kd.yaml search.num_samples")
    parser.add_argument("--epochs", type=int, default=2, help="kd.yaml train.epochs (ASHA's max_t)")
    parser.add_argument("--cache-off", action="store_true", help="kd.yaml teacher_cache: off (default: left at auto)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a kd.yaml key (dotted, YAML value), e.g. --set teacher_server=off; repeatable")
    parser.add_argument("--smoke", action="store_true", help="seconds: a toy world up to the search (see above)")
    args = parser.parse_args(argv)
    if (args.command is None) != args.smoke:
        parser.error("give a command (build, search or all), or --smoke alone")
    return args


def smoke(args) -> int:
    """--smoke: build a toy world in a scratch folder, write its kd.yaml and load it as the search
    would (tune_kd's config loader), and generate the teacher's reply as the search's figures do."""
    global PADDED_VOCAB
    import _smoke

    from tune_kd.config.experiment import load_config

    folder = _smoke.scratch("real-vocab")
    sample = folder / "sample.jsonl"
    sample.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_conversations(200, 99)),
                      encoding="utf-8")
    _smoke.bpe_tokenizer(folder / "tokenizer", _smoke.conversation_texts(sample) + list(SYSTEM_PROMPTS), 500)
    PADDED_VOCAB = 512          # rows past the tokenizer's ids, as Qwen2.5's 151,936 for 151,646
    args.tokenizer, args.world, args.conversations, args.val = str(folder / "tokenizer"), str(folder / "world"), 48, 8
    for role, sizes in (("teacher", (32, 1, 2, 1, 64)), ("student", (16, 1, 2, 1, 32))):
        for key, value in zip(("hidden", "layers", "heads", "kv_heads", "intermediate"), sizes):
            setattr(args, f"{role}_{key}", value)
    args.teacher_epochs, args.teacher_batch_size, args.num_samples, args.epochs = 1, 16, 1, 1
    world = Path(args.world)
    built = build(args, world)
    space = write_experiment(args, world, built["max_seq_len"])
    cfg = load_config(space)
    print(f"experiment: {space} loads: {cfg.name}, {cfg.search.num_samples} trial(s) x {cfg.train.epochs} epoch(s), "
          f"searching {', '.join(sorted(cfg.parameters))}; the search is not run under --smoke")
    first = json.loads((world / "data" / "val.jsonl").read_text(encoding="utf-8").splitlines()[0])["messages"]
    turn = next(i for i, m in enumerate(first) if m["role"] == "assistant")
    reply, model = generate(world / "teacher", first[:turn], max_new_tokens=8)
    print(f"teacher reply: {reply!r}; reloaded {type(model).__name__} with "
          f"{model.get_input_embeddings().weight.shape[0]} vocab rows")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.smoke:
        return smoke(args)
    missing = [name for name in TOKENIZER_FILES if not (Path(args.tokenizer) / name).is_file()]
    if missing:
        print(f"error: Qwen2.5 tokenizer not found: {args.tokenizer} lacks {', '.join(missing)} (give --tokenizer DIR, "
              "a copy of ../shared/tokenizers/qwen2.5)", file=sys.stderr)
        return 2
    world = Path(args.world).resolve()
    if args.command in ("build", "all"):
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        built = build(args, world)
        write_experiment(args, world, built["max_seq_len"])
        print(f"experiment: {world / 'kd.yaml'}")
    if args.command in ("search", "all"):
        return search(args, world)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
