"""Typed run configuration: dataclasses, TOML run files and dotted CLI overrides.

Precedence is defaults < TOML file < `--section.key=value` overrides. Unknown keys and values
of the wrong type raise `ConfigError` naming the key and what is valid.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A run file or override that cannot be used; the message says how to fix it."""


# A bound on model size (8 GB of fp32 weights): a config from a stranger cannot make a loader
# allocate more than this, and far beyond what azgpt's single-node recipes train.
MAX_PARAMS = 2_000_000_000


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    """Number of token ids; must be at least the tokenizer's vocab size."""
    block_size: int = 512
    """Context length in tokens."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Model width."""
    dropout: float = 0.0
    """Dropout on attention, residual and embeddings (0 for pretraining)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers (GPT-2 style; arch "llama" never has biases)."""
    arch: str = "gpt2"
    """'gpt2': learned positions, LayerNorm, GELU MLP, tied head (the seed's model). 'llama':
    rotary positions, RMSNorm, SwiGLU MLP, no biases; the options below apply to it only."""
    n_kv_head: int = 0
    """llama: key/value heads (grouped-query attention); must divide n_head. 0: n_head."""
    qk_norm: bool = False
    """llama: RMSNorm on each head's queries and keys before the rotation (Qwen3 style)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head; false gives llama its own head."""
    rope_theta: float = 10000.0
    """llama: base of the rotary frequencies."""
    mlp_hidden: int = 0
    """llama: SwiGLU hidden width. 0: 8/3 n_embd rounded up to a multiple of 64 (about the
    parameters of gpt2's 4 n_embd GELU MLP)."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_hidden(self) -> int:
        if self.arch != "llama":
            return 4 * self.n_embd
        return self.mlp_hidden or -(-8 * self.n_embd // 3 // 64) * 64

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_params(self) -> int:
        """Parameters of the model this config describes (tied head counted once)."""
        d = self.n_embd
        if self.arch == "llama":
            hs = d // max(1, self.n_head)
            kv = self.kv_heads * hs
            per_layer = 2 * d * d + 2 * d * kv + 3 * d * self.ffn_hidden + 2 * d
            per_layer += 2 * hs * int(self.qk_norm)
            heads = 1 if self.tie_embeddings else 2
            return heads * self.vocab_size * d + self.n_layer * per_layer + d
        b = int(self.bias)
        per_layer = 12 * d * d + b * (3 * d + d + 4 * d + d) + 2 * d * (1 + b)
        return (self.vocab_size + self.block_size) * d + self.n_layer * per_layer + d * (1 + b)

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if v <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {v}.")
        if self.block_size > 1_000_000:
            raise ConfigError(
                f"model.block_size={self.block_size} is absurdly large; use a context of at most 1,000,000 tokens (512 is the default)."
            )
        if self.vocab_size > 1_000_000 or self.n_embd > 65536 or self.n_layer > 1000:
            raise ConfigError(
                "model size is absurd (vocab_size <= 1,000,000, n_embd <= 65536, n_layer <= 1000); check the model section."
            )
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}."
            )
        if self.arch not in ("gpt2", "llama"):
            raise ConfigError(f"model.arch must be 'gpt2' or 'llama', got {self.arch!r}.")
        if self.arch == "gpt2":
            for name, default in (
                ("n_kv_head", 0),
                ("qk_norm", False),
                ("tie_embeddings", True),
                ("mlp_hidden", 0),
            ):
                if getattr(self, name) != default:
                    raise ConfigError(
                        f"model.{name} applies to arch 'llama' only; set model.arch = \"llama\" "
                        f"or remove model.{name}."
                    )
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise ConfigError(
                f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head} (0: n_head)."
            )
        if self.mlp_hidden < 0 or self.mlp_hidden > 1_000_000:
            raise ConfigError(f"model.mlp_hidden must be in [0, 1,000,000], got {self.mlp_hidden}.")
        if self.arch == "llama" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(
                f"model.arch 'llama' rotates pairs of dimensions: the head size n_embd/n_head="
                f"{self.n_embd // self.n_head} must be even."
            )
        if not (self.rope_theta > 1 and self.rope_theta < 1e12):
            raise ConfigError(f"model.rope_theta must be in (1, 1e12), got {self.rope_theta}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}.")
        if self.num_params() > MAX_PARAMS:
            raise ConfigError(
                f"the model section describes {self.num_params():,} parameters, more than azgpt's "
                f"limit of {MAX_PARAMS:,}; lower model.n_layer or model.n_embd."
            )


@dataclass
class DataConfig:
    dir: str = "out/data"
    """Folder holding train.npy, val.npy and manifest.json written by `azgpt prepare`."""
    tokenizer: str = "out/tokenizer"
    """Tokenizer folder (tokenizer.json); its sha256 must match the data's manifest."""


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    """Where checkpoints, metrics.jsonl and plots go."""
    batch_size: int = 12
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_iters: int = 5000
    """Optimizer steps in the whole run (derived from train.tokens when that is set)."""
    tokens: int = 0
    """Tokens the whole run trains on; sets max_iters = ceil(tokens / tokens per step). 0: the
    run is sized by max_iters. Both given and disagreeing is refused."""
    batch_tokens: int = 0
    """Tokens per optimizer step over all processes (the global batch); sets grad_accum =
    batch_tokens / (batch_size x block_size x processes), which must divide evenly. 0: the
    global batch is batch_size x block_size x grad_accum x processes."""
    lr: float = 6e-4
    """Peak learning rate."""
    min_lr: float = 6e-5
    """Floor the cosine decays to."""
    warmup_iters: int = 200
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only."""
    beta1: float = 0.9
    """AdamW's first-moment decay (momentum)."""
    beta2: float = 0.95
    """AdamW's second-moment decay (0.95, as GPT-3 and nanoGPT: steadier than 0.999 at high lr)."""
    optimizer: str = "adamw"
    """'adamw' for every parameter, or 'muon': torch.optim.Muon (orthogonalised momentum) for
    the 2-D matrices inside the blocks, AdamW for embeddings, head, norms and biases."""
    muon_lr: float = 0.02
    """Peak learning rate of the Muon matrices (train.lr stays the AdamW groups' peak); the
    schedule scales both alike."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    eval_interval: int = 500
    """Steps between validation passes and checkpoints."""
    eval_iters: int = 20
    """Validation batches per evaluation (a fixed set of windows)."""
    log_interval: int = 10
    """Steps between reading the loss back from the device (a sync) and logging it."""
    mixed_precision: str = "auto"
    """'auto' (bf16 on CUDA cards with native bf16, compute capability 8.0+; fp16 with loss
    scaling on older cards such as T4 and V100; no on CPU), 'bf16', 'fp16' or 'no'."""
    compile: str = "auto"
    """torch.compile: 'auto' (on for CUDA, off on CPU), 'on', 'off', or a mode ('reduce-overhead', 'max-autotune')."""
    stop_at: int = 0
    """Stop (with a checkpoint) after this step though the schedule runs to max_iters; resume
    later with --resume. 0 runs to max_iters. For time-boxed or preemptible jobs."""
    seed: int = 1337
    """Seeds the model init and the data loader."""
    keep_last: int = 2
    """Numbered checkpoints to keep besides `last` and `best`."""
    sample_prompt: str = "Azərbaycanın paytaxtı"
    """Prompt sampled at each evaluation."""
    sample_tokens: int = 32
    """Tokens sampled at each evaluation (0 disables)."""
    early_stop_patience: int = 0
    """Stop after this many evaluations in a row without a better validation loss (0: never);
    `best` keeps the best checkpoint."""
    nan_policy: str = "stop"
    """On a non-finite loss: 'stop' (keep the last good checkpoint) or 'skip' the step."""
    tensorboard: bool = False
    """Also log to TensorBoard through Accelerate's trackers."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""
    init_from: str = ""
    """A checkpoint folder (e.g. runs/base/best) whose weights a new run starts from, with a
    fresh optimizer and schedule at step 0 (fine-tuning); its tokenizer must be the data's.
    Empty: random initialisation. Ignored on --resume, which continues the run's own state."""

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "log_interval"):
            v = getattr(self, name)
            if v <= 0:
                raise ConfigError(f"train.{name} must be a positive integer, got {v}.")
        for name in (
            "eval_iters",
            "tokens",
            "batch_tokens",
            "warmup_iters",
            "keep_last",
            "sample_tokens",
            "stop_at",
            "early_stop_patience",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}.")
        if self.batch_size > 1_000_000:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is absurd; use a value such as 12."
            )
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"train.seed must be in [0, 2**32), got {self.seed}.")
        for name, top in (
            ("eval_iters", 100_000),
            ("grad_accum", 100_000),
            ("sample_tokens", 100_000),
        ):
            if getattr(self, name) > top:
                raise ConfigError(
                    f"train.{name}={getattr(self, name)} is absurd (at most {top:,}); use a value such as 20."
                )
        if not self.out_dir.strip():
            raise ConfigError("train.out_dir is empty; give a run folder such as runs/mine.")
        if self.early_stop_patience and not self.eval_iters:
            raise ConfigError(
                "train.early_stop_patience needs validation: set train.eval_iters > 0."
            )
        if self.log_interval > 100_000:
            raise ConfigError(
                f"train.log_interval={self.log_interval} is absurd; use a value such as 10."
            )
        import math

        for name in ("grad_clip", "weight_decay"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"train.{name} must be a finite number >= 0, got {v}.")
        if not (0 < self.lr < 10):
            raise ConfigError(f"train.lr must be in (0, 10), got {self.lr}.")
        if not (0 <= self.min_lr <= self.lr):
            raise ConfigError(f"train.min_lr must be in [0, train.lr], got {self.min_lr}.")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise ConfigError(
                f"train.mixed_precision must be one of auto, bf16, fp16, no; got {self.mixed_precision!r}."
            )
        if self.compile not in (
            "auto",
            "on",
            "off",
            "default",
            "reduce-overhead",
            "max-autotune",
            "max-autotune-no-cudagraphs",
        ):
            raise ConfigError(
                f"train.compile must be auto, on, off or a torch.compile mode; got {self.compile!r}."
            )
        if self.nan_policy not in ("stop", "skip"):
            raise ConfigError(
                f"train.nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}."
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be auto, cpu or cuda, got {self.device!r}.")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"train.optimizer must be 'adamw' or 'muon', got {self.optimizer!r}.")
        if not (0 < self.muon_lr < 10):
            raise ConfigError(f"train.muon_lr must be in (0, 10), got {self.muon_lr}.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("train.beta1 and train.beta2 must be in [0, 1).")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(section: str, key: str, value, typ, from_cli: bool):
    """Return `value` as `typ`, or raise ConfigError saying what was expected."""
    where = f"{section}.{key}"
    if from_cli and isinstance(value, str):
        if typ is bool:
            low = value.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"{where} expects true or false, got {value!r}.")
        if typ is int:
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{where} expects an integer, got {value!r}.") from None
        if typ is float:
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where} expects a number, got {value!r}.") from None
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} expects true or false, got {value!r}.")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} expects an integer, got {value!r}.")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} expects a number, got {value!r}.")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} expects a string, got {value!r}.")
    raise ConfigError(f"{where}: unsupported type {typ}.")


def _apply(cfg: RunConfig, section: str, key: str, value, from_cli: bool) -> None:
    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    if section not in sections:
        raise ConfigError(
            f"unknown config section {section!r}; valid sections are {', '.join(sections)}."
        )
    sub = getattr(cfg, section)
    hints = typing.get_type_hints(type(sub))
    if key not in hints:
        raise ConfigError(
            f"unknown config key {section}.{key}; valid keys in [{section}] are {', '.join(hints)}."
        )
    setattr(sub, key, _coerce(section, key, value, hints[key], from_cli))


def parse_overrides(args: list[str]) -> list[tuple[str, str, str]]:
    """Parse `--section.key=value` (or `--section.key value`) into triples."""
    out = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or "." not in a.split("=", 1)[0]:
            raise ConfigError(
                f"unrecognised argument {a!r}; config overrides look like --train.lr=3e-4."
            )
        name, eq, value = a[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{name} needs a value, e.g. --{name}=VALUE.")
            value = args[i + 1]
            i += 1
        section, _, key = name.partition(".")
        out.append((section, key.replace("-", "_"), value))
        i += 1
    return out


def size_run(cfg: RunConfig, world: int, explicit: set[str] | None = None) -> RunConfig:
    """Resolve a run sized in tokens for `world` processes: grad_accum from train.batch_tokens,
    max_iters from train.tokens. `explicit`: the keys the file or command line set (a value
    that was set and disagrees with the derived one is refused; a default is replaced)."""
    tc, T = cfg.train, cfg.model.block_size
    explicit = getattr(cfg, "explicit", set()) if explicit is None else explicit
    micro = tc.batch_size * T * world
    if tc.batch_tokens:
        if tc.batch_tokens % micro:
            raise ConfigError(
                f"train.batch_tokens={tc.batch_tokens:,} is not a multiple of train.batch_size x "
                f"model.block_size x {world} process(es) = {micro:,}; choose a multiple of it."
            )
        accum = tc.batch_tokens // micro
        if "train.grad_accum" in explicit and tc.grad_accum != accum:
            raise ConfigError(
                f"train.grad_accum={tc.grad_accum} disagrees with train.batch_tokens={tc.batch_tokens:,} "
                f"({accum} on {world} process(es)); set only one of them."
            )
        tc.grad_accum = accum
    step = tc.batch_size * T * tc.grad_accum * world
    if tc.tokens:
        iters = -(-tc.tokens // step)
        if "train.max_iters" in explicit and tc.max_iters != iters:
            raise ConfigError(
                f"train.max_iters={tc.max_iters:,} disagrees with train.tokens={tc.tokens:,} "
                f"({iters:,} steps of {step:,} tokens); set only one of them."
            )
        tc.max_iters = iters
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a validated RunConfig from defaults, an optional TOML file and CLI overrides."""
    cfg = RunConfig()
    explicit: set[str] = set()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist; pass a TOML run file such as configs/tiny.toml."
            )
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid TOML ({e}); fix the syntax.") from None
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{p}: top-level key {section!r} must be a table such as [train]."
                )
            for key, value in table.items():
                _apply(cfg, section, key, value, from_cli=False)
                explicit.add(f"{section}.{key}")
    for section, key, value in parse_overrides(overrides or []):
        _apply(cfg, section, key, value, from_cli=True)
        explicit.add(f"{section}.{key}")
    cfg.validate()
    cfg.explicit = explicit  # which keys were set, for size_run (not part of the saved config)
    size_run(copy.deepcopy(cfg), 1)  # refuse a disagreement before anything starts
    return cfg
