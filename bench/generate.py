"""Single-stream decoding speed: azgpt's generation path beside llama.cpp on the same checkpoint.

For each architecture (gpt2, llama) a checkpoint of the 110M shape (configs/gpt100m.toml: 12 x
768, 32k vocab; random weights: speed does not depend on the values) is exported with
`azgpt export --format gguf` as f32 and q8_0. Then, in one process and interleaved round by
round (the machine is shared: interleaving spreads its load over every contender), each
contender decodes --tokens greedy tokens after the same short prompt with the same threads:

- azgpt fp32: `azgpt.generate` (the Decoder `azgpt sample` and `azgpt serve` run), its
  decoding step compiled and its products azgpt's CPU kernel (`azgpt.cpu_kernel`), as
  `azgpt sample` / `serve` / `chat` run them on a CPU;
- azgpt fp32, oneDNN products: the same compiled step with oneDNN's products instead;
- azgpt fp32, torch Linear: eager torch with its default BLAS (for reference);
- azgpt bf16: `--dtype bfloat16` (oneDNN's bf16 kernels where the CPU has them);
- azgpt int8: the same path with `--dtype int8` (weights rounded to int8 per output row, the
  kernel converting them in registers);
- llama.cpp f32 and q8_0: llama-cpp-python on the exported files.

Decode tokens/s counts the tokens after the first (the prompt's prefill is excluded). On a
shared machine other jobs slow some rounds several-fold; the best round of each contender (its
least disturbed) is the comparison, with every round printed beside it.

.venv/bin/python bench/generate.py [--threads 2] [--tokens 128] [--rounds 3] [--archs gpt2,llama]

Needs azgpt[gguf] (llama-cpp-python). Prints one JSON object and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # bench/gguf.py would shadow the `gguf` package


def make_checkpoint(arch: str, tok_dir: Path, out: Path) -> Path:
    import torch

    from azgpt.checkpoint import save_model_files
    from azgpt.config import load_config
    from azgpt.model import GPT

    cfg = load_config(ROOT / "configs/gpt100m.toml", []).model
    if arch == "llama":
        cfg = type(cfg)(**{**cfg.to_dict(), "arch": "llama", "bias": False})
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    save_model_files(GPT(cfg), out)
    shutil.copyfile(tok_dir / "tokenizer.json", out / "tokenizer.json")
    (out / "meta.json").write_text("{}\n")
    return out


def torch_runner(model, tok, prompt, n):
    from azgpt.generate import Finished, SamplingParams, generate_events

    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    def run() -> float:
        for ev in generate_events(model, tok, prompt, params):
            if isinstance(ev, Finished):
                assert ev.completion_tokens == n, ev
                return (n - 1) / (ev.eval_ns / 1e9)
        raise AssertionError("no Finished event")

    return run


def _llama_child(conn, path: str, prompt, n: int, threads: int) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=path, n_ctx=512, n_threads=threads,
        n_threads_batch=threads, verbose=False, seed=0,
    )  # fmt: skip
    while conn.recv() == "run":
        k, t1 = 0, None
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            k += 1
            if k == 1:
                t1 = time.perf_counter()
            if k == n:
                break
        conn.send((n - 1) / (time.perf_counter() - t1))


def llama_runner(path: Path, prompt, n, threads, children: list):
    """llama.cpp in a child process (llama.cpp's decode crashed in a process that had run
    torch's CPU kernels), driven round by round like the other contenders."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_llama_child, args=(child, str(path), prompt, n, threads))
    proc.start()
    children.append((proc, parent))

    def run() -> float:
        parent.send("run")
        return parent.recv()

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--archs", default="gpt2,llama")
    a = ap.parse_args()

    import torch

    from azgpt.checkpoint import checkpoint_tokenizer, load_model
    from azgpt.cpu_linear import pack_linears
    from azgpt.decode_graph import compile_step
    from azgpt.export_gguf import export_gguf
    from azgpt.generate import cast_model, prompt_ids
    from azgpt.tokenizer import save_tokenizer, train_tokenizer

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="azgpt-bench-gen-"))
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "data/sample").glob("*.txt"))]
    save_tokenizer(train_tokenizer(texts, vocab_size=2048), tmp / "tok")
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch "
        f"{torch.__version__}, {a.threads} threads",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "bench/generate.py " + " ".join(sys.argv[1:]),
        "linear_backend": None,
        "tokens": a.tokens,
        "archs": {},
    }
    children: list = []
    try:
        for arch in a.archs.split(","):
            ck = make_checkpoint(arch, tmp / "tok", tmp / arch)
            files = {}
            for q in ("f32", "q8_0"):
                files[q], _ = export_gguf(
                    str(ck), str(tmp / f"{arch}-{q}.gguf"), quant=q,
                    modelfile=str(tmp / f"Modelfile-{arch}-{q}"), force=True,
                )  # fmt: skip
            cpu = torch.device("cpu")
            plain, meta = load_model(ck, "cpu")
            plain.eval()  # torch's own Linear (the default BLAS), as before oneDNN packing
            tok, _, _ = checkpoint_tokenizer(ck, meta)
            prompt = prompt_ids(tok, "Azərbaycanın paytaxtı")
            model = cast_model(load_model(ck, "cpu")[0], "float32", cpu)
            assert model.linear_backend == "kernel", model.linear_backend
            res["linear_backend"] = model.linear_backend
            onednn = load_model(ck, "cpu")[0].eval()  # the same step, oneDNN's products
            onednn.linear_backend = pack_linears(onednn, kernel=False)
            assert onednn.linear_backend == "onednn", onednn.linear_backend
            onednn.decode_graph = compile_step(onednn)
            bf16 = cast_model(load_model(ck, "cpu")[0], "bfloat16", cpu)
            int8 = cast_model(load_model(ck, "cpu")[0], "int8", cpu)
            runners = {
                "azgpt fp32": torch_runner(model, tok, prompt, a.tokens),
                "azgpt fp32, oneDNN products": torch_runner(onednn, tok, prompt, a.tokens),
                "azgpt fp32, torch Linear": torch_runner(plain, tok, prompt, a.tokens),
                "azgpt bf16 (--dtype bfloat16)": torch_runner(bf16, tok, prompt, a.tokens),
                "azgpt int8 (--dtype int8)": torch_runner(int8, tok, prompt, a.tokens),
                "llama.cpp f32": llama_runner(files["f32"], prompt, a.tokens, a.threads, children),
                "llama.cpp q8_0": llama_runner(
                    files["q8_0"], prompt, a.tokens, a.threads, children
                ),
            }
            for run in runners.values():  # warm up (first-call allocations, page faults)
                run()
            got: dict[str, list[float]] = {k: [] for k in runners}
            for _ in range(a.rounds):
                for k, run in runners.items():
                    got[k].append(run())
            med = {k: max(v) for k, v in got.items()}  # the least disturbed round
            res["archs"][arch] = {
                "params": plain.num_params(),
                "tok_s_best": {k: round(v, 1) for k, v in med.items()},
                "tok_s_median": {k: round(statistics.median(v), 1) for k, v in got.items()},
                "all_rounds": {k: [round(x, 1) for x in v] for k, v in got.items()},
                "vs_llama_f32": {k: round(v / med["llama.cpp f32"], 2) for k, v in med.items()},
                "vs_llama_q8_0": {k: round(v / med["llama.cpp q8_0"], 2) for k, v in med.items()},
            }
            print(json.dumps({arch: res["archs"][arch]}), flush=True)
            del runners, model, onednn, plain, bf16, int8
            for proc, conn in children:
                conn.send("stop")
                proc.join(timeout=30)
            children.clear()
    finally:
        for proc, conn in children:
            conn.send("stop")
            proc.join(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2, ensure_ascii=False))
    print()
    print(
        "| arch | contender | decode tokens/s (best round) | vs llama.cpp f32 | vs llama.cpp q8_0 |"
    )
    print("|---|---|---:|---:|---:|")
    for arch, r in res["archs"].items():
        for k, v in r["tok_s_best"].items():
            print(
                f"| {arch} | {k} | {v:.1f} | {r['vs_llama_f32'][k]:.2f}x "
                f"| {r['vs_llama_q8_0'][k]:.2f}x |"
            )


if __name__ == "__main__":
    main()
