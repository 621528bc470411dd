"""Checkpoints: folders holding model.safetensors, config.json, meta.json and the resumable state
(optimizer.safetensors + trainer_state.json). No pickle anywhere: loading a checkpoint from
someone else never executes code.

A run folder holds numbered checkpoints (`step-000500/`) and two relative symlinks, `last` and
`best`. Each checkpoint is written under a temporary name and renamed into place, then the
symlinks are swapped atomically, so a crash never leaves a half checkpoint as the latest.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .fsutil import _umask, check_writable, fsync_dir, is_disk_full, open_no_follow
from .model import GPT, GPTConfig

STEP_DIR = re.compile(r"^step-(\d{6,})$")
TIED = "lm_head.weight"


# ----------------------------------------------------------------------------- model weights


def tied(cfg) -> bool:
    """Whether lm_head.weight is the token embedding (then saved once, and re-tied on load)."""
    return getattr(cfg, "tie_embeddings", True)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped, uncompiled model's tensors, minus a tied lm_head (restored on load)."""
    sd = model.state_dict()
    skip = TIED if tied(model.config) else None
    return {k: cpu_copy(v) for k, v in sd.items() if k != skip}


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy that owns its memory (`.cpu()` of a CPU tensor is the tensor itself, which the
    next optimizer step would change under a background checkpoint write)."""
    return t.detach().to("cpu", copy=True).contiguous()


def save_model_files(model: GPT, folder: Path, state: dict | None = None) -> None:
    """`state`: an already gathered full state dict (FSDP), else the model's own."""
    sd = (
        model_state(model)
        if state is None
        else {
            k: v.contiguous().cpu() for k, v in state.items() if k != TIED or not tied(model.config)
        }
    )
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing; {what}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path} is not valid JSON (or nested too deeply); {what}") from None
    if not isinstance(d, dict):
        raise UserError(f"{path} does not hold a JSON object; {what}")
    return d


def load_model(ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Load a checkpoint folder; returns (model, meta).

    A checkpoint may come from a stranger, so nothing is allocated before it is checked: the
    config must describe a model within azgpt's size limit, and model.safetensors' header (read
    alone, bounded) must hold exactly that model's tensors and shapes. Only then is the model
    built (on the meta device, no initialisation) and filled from the file."""
    folder = Path(ckpt)
    if not folder.is_dir():
        raise UserError(
            f"checkpoint folder {folder} does not exist; pass a folder such as runs/tiny/last."
        )
    fix = "the checkpoint is incomplete or damaged; use another checkpoint (e.g. an earlier step-* folder)."
    cfg_d = read_json(folder / "config.json", fix)
    try:
        cfg = GPTConfig(**cfg_d)
        cfg.validate()
    except (TypeError, ValueError) as e:
        why = f" ({e})" if isinstance(e, ValueError) else ""
        raise UserError(
            f"{folder / 'config.json'} does not describe an azgpt model{why}; {fix}"
        ) from None
    meta = read_json(folder / "meta.json", fix) if (folder / "meta.json").exists() else {}
    with torch.device("meta"):
        model = GPT(cfg)
    check_header(model, folder / "model.safetensors")
    model = model.to_empty(device="cpu")
    load_weights(model, folder / "model.safetensors")
    return model.to(device), meta


MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit for the JSON header


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header, reading nothing else."""
    bad = f"{path} is truncated or corrupt (bad safetensors header); use another checkpoint."
    if not path.is_file():
        raise UserError(f"{path} is missing; the checkpoint is incomplete, use another one.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(bad)
        n = int.from_bytes(raw, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise UserError(bad)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise UserError(bad) from None
    if not isinstance(header, dict):
        raise UserError(bad)
    out = {}
    data_bytes = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = (
                all(isinstance(x, int) and x >= 0 for x in (*shape, lo, hi))
                and lo <= hi <= data_bytes
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise UserError(bad)
        out[name] = (dtype, shape)
    return out


def check_header(model: GPT, path: Path) -> None:
    """Refuse a weights file whose tensors are not exactly this model's (before loading it)."""
    header = read_header(path)
    skip = TIED if tied(model.config) else None
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != skip}
    missing, extra = sorted(set(own) - set(header)), sorted(set(header) - set(own))
    if missing or extra:
        raise UserError(
            f"{path} does not match config.json (missing {missing[:3]}, unexpected {extra[:3]}); "
            "use a checkpoint whose config.json and weights belong together."
        )
    for k, shape in own.items():
        if header[k][1] != shape:
            raise UserError(
                f"{path} holds {k} of shape {header[k][1]} but config.json describes {shape}; "
                "use a checkpoint whose config.json and weights belong together."
            )


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file (never pickle); a missing, truncated or corrupt file is a UserError."""
    if not path.is_file():
        raise UserError(f"{path} is missing; the checkpoint is incomplete, use another one.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(
            f"{path} is truncated or corrupt ({str(e).splitlines()[0][:80]}); use another checkpoint."
        ) from None


def load_weights(model: GPT, path: Path) -> None:
    sd = load_tensors(path)
    skip = TIED if tied(model.config) else None
    own = {k: v for k, v in model.state_dict().items() if k != skip}
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        raise UserError(
            f"{path} does not match the model (missing {missing[:3]}, unexpected {extra[:3]}); "
            "use a checkpoint of this model's shape."
        )
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise UserError(
                f"{path} holds {k} of shape {tuple(v.shape)} but the model needs {tuple(own[k].shape)}; "
                "the checkpoint is from a model of another shape (check the model section)."
            )
    model.load_state_dict(sd, strict=False)
    if skip:
        model.lm_head.weight = model.transformer.wte.weight  # re-tie


def pick_device(name: str = "auto") -> torch.device:
    """`--device`: auto (CUDA when visible), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu or cuda.") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported; use auto, cpu or cuda.")
    return dev


TOKENIZER_FILE = "tokenizer.json"  # a copy of the run's tokenizer inside every checkpoint


def checkpoint_tokenizer(ckpt: str | Path, meta: dict, override: str | None = None):
    """(tokenizer, its sha256, its path) for a checkpoint: `--tokenizer` if given, else the
    copy inside the checkpoint folder, else (older checkpoints) the path recorded in meta.json.
    The copy travels with the folder, so a run copied to another machine works on its own."""
    from .fsutil import sha256_file
    from .tokenizer import load_tokenizer, tokenizer_path

    folder = Path(ckpt)
    if override is not None:
        path = tokenizer_path(override)
    elif (folder / TOKENIZER_FILE).is_file():
        path = folder / TOKENIZER_FILE
    elif meta.get("tokenizer_path"):
        path = tokenizer_path(meta["tokenizer_path"])
    else:
        raise UserError(
            f"{folder} holds no tokenizer.json and meta.json names none; pass --tokenizer DIR."
        )
    tok = load_tokenizer(path)
    sha = sha256_file(path)
    want = meta.get("tokenizer_sha256")
    if want and sha != want:
        if override is not None and (folder / TOKENIZER_FILE).is_file():
            hint = "omit --tokenizer to use the copy inside the checkpoint"
        elif override is not None:
            hint = "pass the tokenizer it was trained with"
        elif path == folder / TOKENIZER_FILE:
            hint = "the checkpoint's own tokenizer.json was changed; restore it from the run"
        else:
            hint = "pass the tokenizer it was trained with as --tokenizer DIR"
        raise UserError(
            f"tokenizer {path} is not the one {folder} was trained with (sha256 differs); {hint}."
        )
    vocab = (meta.get("config") or {}).get("model", {}).get("vocab_size")
    if isinstance(vocab, int) and tok.get_vocab_size() > vocab:
        raise UserError(
            f"tokenizer {path} has {tok.get_vocab_size()} ids but the model {folder} has {vocab}; "
            "pass the tokenizer the model was trained with."
        )
    return tok, sha, path


# ----------------------------------------------------------------------------- optimizer state


# AdamW's implementation switches: they describe this machine, not the training state, so they
# are neither saved nor restored (a CPU checkpoint resumed on a GPU uses the fused kernel).
_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable", "params")


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """(tensors, info): the full optimizer state keyed by parameter name, for safetensors + JSON.

    Works for one process, DDP and FSDP alike (`torch.distributed.checkpoint.state_dict`
    gathers FSDP shards into full tensors); under FSDP it is a collective, so every rank calls
    it, and only rank 0 receives the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    tensors, scalars = {}, {}
    for name, st in osd.get("state", {}).items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{name}.{k}"] = cpu_copy(v)
            else:
                scalars[f"{name}.{k}"] = v
    groups = [
        {
            **{
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in g.items()
                if k not in _IMPL_KEYS
            },
            "param_names": list(g["params"]),
        }
        for g in osd.get("param_groups", [])
    ]
    return tensors, {"format": "named", "param_groups": groups, "scalars": scalars}


def restore_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict, info: dict
) -> None:
    """Load what `optimizer_state` saved into a (possibly wrapped or sharded) model's optimizer;
    every rank passes the full state and FSDP keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state: dict = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            name, k = key[len("optim.") :].rsplit(".", 1)
            state.setdefault(name, {})[k] = t
    for key, v in info.get("scalars", {}).items():
        name, k = key.rsplit(".", 1)
        state.setdefault(name, {})[k] = v
    current = optimizer.param_groups
    saved = info.get("param_groups", [])
    if len(saved) != len(current):
        raise UserError(
            f"the checkpoint's optimizer has {len(saved)} parameter groups but this run has "
            f"{len(current)}; resume with the config the run was trained with."
        )
    groups = []
    for g, cur in zip(saved, current):
        g = dict(g)
        names = g.pop("param_names")
        g.update({k: cur[k] for k in _IMPL_KEYS if k in cur and k != "params"})
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append({**g, "params": names})
    set_optimizer_state_dict(
        model,
        optimizer,
        {"state": state, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True),
    )


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (gathered) weights of a possibly sharded model; a collective under FSDP, every
    rank calls it and rank 0 receives the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


# ----------------------------------------------------------------------------- run folders


class RunLock:
    """An exclusive lock on a run folder (flock: the kernel drops it when the process dies, so a
    killed trainer never leaves it stuck)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"
        self.fd = None

    def acquire(self) -> None:
        check_writable(self.path, "train.out_dir")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot use {self.path.parent} as the run folder ({e.strerror}); choose another train.out_dir."
            ) from None
        # Never through a link, and only a plain file of our own: a planted link or hard link
        # to another file must not get that file overwritten with our PID.
        fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise UserError(
                f"{self.path} is not a plain lock file (a link or special file); remove it and rerun."
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"another trainer (pid {holder}) is already using {self.path.parent}; "
                "wait for it to finish or choose another train.out_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def step_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = STEP_DIR.match(p.name)
            if m and p.is_dir() and not p.is_symlink():
                out.append((int(m.group(1)), p))
    return sorted(out)


def is_complete(folder: Path) -> bool:
    need = (
        "model.safetensors",
        "config.json",
        "meta.json",
        "optimizer.safetensors",
        "trainer_state.json",
    )
    if not all((folder / n).is_file() for n in need):
        return False
    try:
        json.loads((folder / "meta.json").read_text())
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


def latest_checkpoint(out_dir: Path) -> Path | None:
    for _, p in reversed(step_dirs(out_dir)):
        if is_complete(p):
            return p
    return None


def clean_stale_temps(out_dir: Path) -> None:
    if out_dir.is_dir():
        for p in out_dir.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)


def _point(out_dir: Path, name: str, target: Path) -> None:
    link = out_dir / name
    tmp = out_dir / f".{name}.{os.getpid()}.lnk"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target.name, tmp)
    os.replace(tmp, link)


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: GPT,
    optimizer: tuple[dict, dict],
    meta: dict,
    trainer_state: dict,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    is_best: bool = False,
    keep_last: int = 2,
    model_sd: dict | None = None,
    tokenizer_file: Path | None = None,
) -> Path:
    """Write step-NNNNNN atomically, point `last` (and `best`) at it, prune old ones."""
    final = out_dir / f"step-{step:06d}"
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=out_dir))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; checkpoints follow the umask
        save_model_files(model, tmp, model_sd)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        slow = os.environ.get("AZGPT_FAULT_SLOW_SAVE")
        if slow:  # fault-injection point for tests: widens the mid-write window
            time.sleep(float(slow))
        tensors, opt_info = optimizer
        tensors = {**tensors, **(extra_tensors or {})}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(
            json.dumps({**trainer_state, "optimizer": opt_info}) + "\n"
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~_umask())  # safetensors writes 0600; outputs follow the umask
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(out_dir)
    except (OSError, SafetensorError) as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        # safetensors reports a full disk as SafetensorError("... No space left on device").
        if is_disk_full(e):
            raise UserError(
                f"the disk filled up while writing checkpoint {final}; the previous checkpoint is intact. "
                "Free some space and rerun with --resume."
            ) from None
        why = getattr(e, "strerror", None) or str(e).splitlines()[0][:80]
        raise UserError(
            f"cannot write checkpoint {final} ({why}); the previous checkpoint is intact."
        ) from None
    _point(out_dir, "last", final)
    if is_best:
        _point(out_dir, "best", final)
    _prune(out_dir, keep_last)
    return final


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time, so training goes on while the
    files are written and fsynced (a 1.32 GB checkpoint took 3.7 s to write synchronously).
    The caller hands over host copies (`cpu_copy`) that nothing else changes; `save_checkpoint`
    keeps each write atomic. An error of a write (a full disk) is raised by the next `submit` or
    `wait`, on the training thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, *args, **kwargs) -> None:
        """`save_checkpoint(*args, **kwargs)` in the background, after the previous write."""
        self.wait()

        def write() -> None:
            try:
                save_checkpoint(*args, **kwargs)
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=write, name="azgpt-checkpoint")
        self._thread.start()

    def wait(self, raise_error: bool = True) -> None:
        """Block until the write in flight is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None and raise_error:
            err, self._error = self._error, None
            raise err

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def _prune(out_dir: Path, keep_last: int) -> None:
    keep = set()
    for name in ("last", "best"):
        link = out_dir / name
        if link.is_symlink():
            keep.add((out_dir / os.readlink(link)).name)
    dirs = step_dirs(out_dir)
    for _, p in dirs[: max(0, len(dirs) - max(keep_last, 1))]:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def read_trainer_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    info = read_json(
        folder / "trainer_state.json", "the checkpoint is incomplete; use another one."
    )
    return info, load_tensors(folder / "optimizer.safetensors")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
