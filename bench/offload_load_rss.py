"""Peak host memory while setting up zo2.offload from a saved checkpoint: block by block against whole.

``python -m memtrain.bench.offload_load_rss --out DIR`` writes a bf16 OPT-shaped checkpoint with
``save_pretrained`` (``--hidden``, ``--layers``; the default is 0.53 B parameters, 1.06 GB on disk), then,
each in a fresh process, sets up ``zo2.offload(..., device="cpu", amp="bf16")`` from it two ways:

- ``block_by_block``: ``zo2.empty_pretrained`` (meta parameters) and the engine filling its fp32 masters
  from the files one block at a time;
- ``whole``: ``from_pretrained(dtype=float32)`` and then ``offload`` (the whole fp32 model exists first).

Each records the process's peak RSS (``ru_maxrss``), its RSS after set-up (the steady state: the fp32
masters and the resident modules), and the largest block in fp32; ``DIR/results.json`` holds them with the
goal ``peak <= steady + one block``. Deterministic up to the allocator and the page cache: RSS in bytes.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile

from ._harness import provenance


def _rss_bytes() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_checkpoint(path: pathlib.Path, hidden: int, layers: int) -> dict:
    """A random bf16 OPT-shaped causal LM saved with save_pretrained (safetensors shards)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, word_embed_proj_dim=hidden, vocab_size=50272,
                       max_position_embeddings=2048)
    model = OPTForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="400MB")
    files = sorted(path.glob("*.safetensors"))
    return {"n_params": sum(p.numel() for p in model.parameters()), "hidden": hidden, "layers": layers,
            "files": len(files), "bytes_on_disk": sum(f.stat().st_size for f in files)}


def measure(path: pathlib.Path, how: str) -> dict:
    """Set up zo2.offload from ``path`` (``how``: block_by_block or whole); peak and steady RSS."""
    import torch
    from transformers import AutoModelForCausalLM

    import zo2

    baseline = _rss_bytes()
    if how == "block_by_block":
        model = zo2.empty_pretrained(path, torch_dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    opt = zo2.ZOSGD(model.parameters(), lr=1e-6)
    engine = zo2.offload(model, opt, device="cpu", amp="bf16", verbose=False)
    steady = _rss_bytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    block = max(sum(p.numel() * 4 for p in b.parameters()) for b in engine.blocks)
    return {"how": how, "baseline_rss_bytes": baseline, "steady_rss_bytes": steady, "peak_rss_bytes": peak,
            "block_fp32_bytes": block, "peak_over_steady_bytes": peak - steady,
            "peak_over_steady_blocks": (peak - steady) / block, "within_goal": peak <= steady + block}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="bench-runs/offload-load-rss", help="output folder")
    ap.add_argument("--hidden", type=int, default=1536, help="hidden size of the OPT-shaped checkpoint")
    ap.add_argument("--layers", type=int, default=16, help="blocks of the checkpoint")
    ap.add_argument("--measure", nargs=2, metavar=("PATH", "HOW"), help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    if args.measure:
        path, how = pathlib.Path(args.measure[0]), args.measure[1]
        result = write_checkpoint(path, args.hidden, args.layers) if how == "write" else measure(path, how)
        print(json.dumps(result))
        return
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = pathlib.Path(tmp) / "checkpoint"
        child = [sys.executable, "-m", "memtrain.bench.offload_load_rss"]
        info = json.loads(subprocess.run([*child, "--hidden", str(args.hidden), "--layers", str(args.layers),
                                          "--measure", str(ckpt), "write"], check=True, capture_output=True,
                                         text=True, cwd=tmp).stdout.splitlines()[-1])
        # fresh processes, run outside the checkout (whose kernels/ folder would shadow an installed package)
        runs = [json.loads(subprocess.run([*child, "--measure", str(ckpt), how], check=True, capture_output=True,
                                          text=True, cwd=tmp).stdout.splitlines()[-1])
                for how in ("block_by_block", "whole")]
    record = {**provenance("cpu", argv), "checkpoint": info, "runs": runs,
              "goal": "peak RSS during set-up <= steady-state RSS + one block (fp32)"}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    for r in runs:
        print(f"{r['how']:>15}: peak {r['peak_rss_bytes'] / 2**30:.2f} GiB, steady {r['steady_rss_bytes'] / 2**30:.2f}"
              f" GiB, peak - steady = {r['peak_over_steady_blocks']:.2f} blocks (goal <= 1: {r['within_goal']})")


if __name__ == "__main__":
    main()
