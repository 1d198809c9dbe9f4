"""Student checkpoints: a loadable Hugging Face directory plus the state to resume training.

A checkpoint directory holds

    model.safetensors, config.json, generation_config.json   save_pretrained (safetensors)
    tokenizer files                                           the tokenizer the student was trained with
    trainer_state.pt                                          optimizer, grad scaler, progress, RNG states
    progress.json                                             the same progress, human-readable
    manifest.json                                             every other file's size, written last

and is written atomically: into a temporary sibling, then renamed into place, so a crash mid-write
leaves the previous checkpoint intact and never a partial directory under the final name. Replacing
a directory takes two renames (old aside, new in); a crash between them leaves the old one aside,
and restore_interrupted() puts it back before anything reads or writes that name again. Copies made
by others (Ray moves each reported checkpoint into the trial folder) are checked against the
manifest before they are used (is_complete).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tune_kd.config.files import is_no_room, no_room_line, permit_as_umask

TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota); earlier checkpoints are untouched."""

    def __str__(self) -> str:
        return self.strerror


@dataclass
class Progress:
    """Where training stands: `batch` is the next batch of epoch `epoch` (0 at an epoch start)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0                                   # optimizer steps taken
    history: list[dict] = field(default_factory=list)   # the metrics reported at each epoch end


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP / torch.compile / selection wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or getattr(model, "lm", None)
        if inner is None:
            return model
        model = inner


def restore_interrupted(target: Path) -> None:
    """Undo a replacement cut short between its two renames: the previous version goes back."""
    target = Path(target)
    if target.exists():
        return
    aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if aside:
        os.rename(aside[-1], target)


def write_manifest(directory: Path) -> None:
    """Record every file's size; written last, so its presence and agreement mean complete."""
    sizes = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps(sizes, indent=1))


def is_complete(directory: Path) -> bool:
    """Whether every file the manifest lists is there with its size (False without a manifest)."""
    try:
        sizes = json.loads((Path(directory) / MANIFEST).read_text())
        return all((Path(directory) / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError):
        return False


def atomic_directory_write(target: Path, write) -> None:
    """Call write(tmp_dir), add its manifest, then move tmp_dir to `target`, replacing any previous one.

    A full disk surfaces as CheckpointWriteError naming the place and the free space."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        write_manifest(tmp)
        permit_as_umask(tmp)   # mkdtemp made it 0700: an exported student is readable as the umask says
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_room(exc):   # the size of the copy it replaces, else what it wrote before failing
            needed = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) if target.exists() else written
            raise CheckpointWriteError(exc.errno, f"{no_room_line(target, exc, needed)}; earlier checkpoints are "
                                                  "intact") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_student(student: torch.nn.Module, tokenizer, directory: Path) -> None:
    """The student as a Hugging Face model directory (safetensors) with its tokenizer, atomically."""
    def write(tmp: Path) -> None:
        unwrap(student).save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    atomic_directory_write(directory, write)


def save_checkpoint(directory: Path, student, tokenizer, optimizer, scaler, progress: Progress,
                    extra: dict[str, torch.nn.Module] | None = None) -> None:
    """A resumable checkpoint: the HF student plus optimizer, scaler, progress and RNG states, and
    the state of `extra` modules trained alongside (a feature projector) that are not the model."""
    def write(tmp: Path) -> None:
        unwrap(student).save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "progress": asdict(progress),
                 "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                 "extra": {name: module.state_dict() for name, module in (extra or {}).items()}}
        torch.save(state, tmp / TRAINER_STATE)
        (tmp / "progress.json").write_text(json.dumps(asdict(progress), indent=1))
    atomic_directory_write(directory, write)


def load_checkpoint(directory: Path, student, optimizer, scaler,
                    extra: dict[str, torch.nn.Module] | None = None) -> Progress:
    """Restore a checkpoint written by save_checkpoint into `student`, `optimizer`, `scaler`, `extra`."""
    from safetensors.torch import load_file

    from tune_kd.config.errors import UserError

    directory = Path(directory)
    restore_interrupted(directory)
    if not (directory / TRAINER_STATE).is_file():
        raise UserError(f"{directory}: not a tune_kd checkpoint (no {TRAINER_STATE}); resume needs a directory "
                        "written by a training run")
    if not is_complete(directory):
        raise UserError(f"{directory}: incomplete checkpoint (files missing or cut short against its {MANIFEST}); "
                        "resume from an earlier one")
    model = unwrap(student)
    weights = load_file(str(directory / "model.safetensors"), device=str(next(model.parameters()).device))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied embeddings are stored once; anything else missing means another architecture.
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{directory}: checkpoint does not fit the student architecture "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
    saved_extra = state.get("extra", {})
    if set(saved_extra) != set(extra or {}):
        raise UserError(f"{directory}: checkpoint was trained with {sorted(saved_extra) or 'no extra modules'}, this "
                        f"run has {sorted(extra or {}) or 'none'} (resume with the same feature distillation settings)")
    for name, module in (extra or {}).items():
        module.load_state_dict(saved_extra[name])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return Progress(**state["progress"])
