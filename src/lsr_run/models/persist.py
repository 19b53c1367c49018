"""Model folders that cannot lose a tensor, and that other tools open.

``save`` writes the masked LM with ``save_pretrained`` and then completes ``model.safetensors`` with every tensor
the encoder scores with that transformers left out: a transformers version may de-duplicate tied aliases (the
decoder bias of an untied BERT head, say) and re-initialise them on load. ``lsr_run.json`` gets a manifest: a
SHA-256 of every named tensor and the groups of names that share one tensor. ``load`` restores those groups and
checks every tensor against the manifest, so a folder that lacks a tensor, or a transformers version that loads
one differently, is an error naming it, never a silently different model.

The folder is also a sentence-transformers ``SparseEncoder`` (``modules.json``: MLM transformer, then SPLADE max
pooling) and carries a model card (``README.md``) in the Hugging Face format.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import LsrError

WEIGHTS_FILE = "model.safetensors"
SETTINGS_FILE = "lsr_run.json"
ST_POOLING_DIR = "1_SpladePooling"


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dim() else t.reshape(1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer under every name, tied aliases included."""
    out = dict(model.named_parameters(remove_duplicate=False))
    for name, buf in model.named_buffers(remove_duplicate=False):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if attr not in getattr(module, "_non_persistent_buffers_set", set()):
            out[name] = buf
    return out


def tie_groups(tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names that refer to one and the same tensor (groups of two or more)."""
    by_id: dict[int, list[str]] = {}
    for name, t in tensors.items():
        by_id.setdefault(id(t), []).append(name)
    return sorted(sorted(names) for names in by_id.values() if len(names) > 1)


def manifest(model: nn.Module) -> dict:
    tensors = named_tensors(model)
    return {"tensors": {name: tensor_digest(t) for name, t in sorted(tensors.items())},
            "tied": tie_groups(tensors)}


def _complete_weights(model: nn.Module, path: Path) -> list[str]:
    """Add to ``model.safetensors`` every named tensor that ``save_pretrained`` left out; -> the names added."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = path / WEIGHTS_FILE
    if not file.exists():
        raise LsrError(f"{path}: save_pretrained wrote no {WEIGHTS_FILE} (sharded or not safetensors)")
    with safe_open(str(file), "pt") as f:
        present = set(f.keys())
        metadata = f.metadata() or {}
        stored = {k: f.get_tensor(k) for k in present}
    missing = [name for name in named_tensors(model) if name not in present]
    if missing:
        tensors = named_tensors(model)
        for name in missing:
            stored[name] = tensors[name].detach().cpu().contiguous().clone()
        metadata.setdefault("format", "pt")
        save_file(stored, str(file), metadata=metadata)
    return missing


def write_sentence_transformers_config(path: Path, vocab_size: int, max_length: int) -> None:
    """The module config that lets ``sentence_transformers.SparseEncoder(path)`` load the folder."""
    modules = [
        {"idx": 0, "name": "0", "path": "",
         "type": "sentence_transformers.sparse_encoder.models.MLMTransformer"},
        {"idx": 1, "name": "1", "path": ST_POOLING_DIR,
         "type": "sentence_transformers.sparse_encoder.models.SpladePooling"},
    ]
    (path / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_length, "do_lower_case": False}, indent=2) + "\n")
    (path / "config_sentence_transformers.json").write_text(json.dumps(
        {"model_type": "SparseEncoder", "prompts": {"query": "", "document": ""}, "default_prompt_name": None,
         "similarity_fn_name": "dot"}, indent=2) + "\n")
    (path / ST_POOLING_DIR).mkdir(exist_ok=True)
    (path / ST_POOLING_DIR / "config.json").write_text(json.dumps(
        {"pooling_strategy": "max", "activation_function": "relu", "word_embedding_dimension": vocab_size},
        indent=2) + "\n")


def save_model(mlm: nn.Module, tokenizer, settings: dict, path: Path, max_length: int = 256) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # one file, whatever the size: the completion and the check below read exactly one weights file
    mlm.save_pretrained(path, max_shard_size="1000GB")
    tokenizer.save_pretrained(path)
    added = _complete_weights(mlm, path)
    record = dict(settings)
    record["weights"] = manifest(mlm)
    record["weights"]["added_to_file"] = added
    (path / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    write_sentence_transformers_config(path, mlm.get_output_embeddings().weight.shape[0], max_length)
    if not (path / "README.md").exists():
        write_model_card(path)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if isinstance(tensor, nn.Parameter) or attr in module._parameters:
        setattr(module, attr, tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor))
    else:
        module._buffers[attr] = tensor


def _restore_ties(model: nn.Module, groups: list[list[str]]) -> None:
    """Make the model's aliasing match the saved one: each saved group shares one tensor, nothing else does."""
    tensors = named_tensors(model)
    grouped = {name for group in groups for name in group}
    for group in groups:
        present = [n for n in group if n in tensors]
        if present:
            shared = tensors[present[0]]
            for name in present[1:]:
                if tensors[name] is not shared:
                    _set_tensor(model, name, shared)
    tensors = named_tensors(model)
    for name, t in tensors.items():  # names tied on load but saved apart get their own copy
        if name in grouped:
            continue
        others = [n for n, u in tensors.items() if u is t and n != name]
        if others:
            copy = t.detach().clone()
            _set_tensor(model, name, nn.Parameter(copy, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter)
                        else copy)
            tensors = named_tensors(model)


def _copy_from_file(model: nn.Module, path: Path, names: list[str]) -> None:
    from safetensors import safe_open

    with safe_open(str(path / WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
        tensors = named_tensors(model)
        with torch.no_grad():
            for name in names:
                if name in keys:
                    tensors[name].copy_(f.get_tensor(name))


def align(model: nn.Module, alignment: int = 64) -> None:
    """Give every tensor a freshly allocated (aligned) copy of its storage.

    Weights read from a safetensors file can sit at any byte offset; CPU matmul kernels pick different code paths
    for unaligned inputs, so the reloaded model would score about 1e-6 away from the saved one.
    """
    seen: set[int] = set()
    with torch.no_grad():
        for t in named_tensors(model).values():
            if id(t) in seen:
                continue
            seen.add(id(t))
            if t.data_ptr() % alignment:
                t.data = t.data.clone()


def verify(model: nn.Module, expected: dict, path: Path) -> None:
    """Every tensor named in the manifest present in the model, equal to what was saved; ties as saved."""
    tensors = named_tensors(model)
    missing = [n for n in expected["tensors"] if n not in tensors]
    if missing:
        raise LsrError(f"model folder {path}: the model built from it has no tensor {missing[0]} "
                       f"({len(missing)} missing); it was saved by another architecture or transformers version")
    wrong = [n for n, digest in expected["tensors"].items() if tensor_digest(tensors[n]) != digest]
    if wrong:
        raise LsrError(f"model folder {path}: tensor {wrong[0]} differs from the one saved "
                       f"({len(wrong)} differ); the folder is damaged or incomplete")
    if tie_groups({n: t for n, t in tensors.items() if n in expected["tensors"]}) != expected["tied"]:
        raise LsrError(f"model folder {path}: shared tensors differ from the saved model ({expected['tied']})")


def load_model(path: Path) -> tuple[nn.Module, object, dict]:
    """-> (mlm, tokenizer, settings), every tensor checked against the saved manifest."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not (path / SETTINGS_FILE).exists():
        raise LsrError(f"model.path={path}: not an lsr-run model folder (no {SETTINGS_FILE}); "
                       f"it is written by the train stage into <run dir>/model")
    settings = json.loads((path / SETTINGS_FILE).read_text())
    expected = settings.pop("weights", None)
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise LsrError(f"model folder {path}: {WEIGHTS_FILE} is missing; re-run the train stage (or restore the file)")
    try:
        with safe_open(str(weights), "pt") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError) as e:
        raise LsrError(f"model folder {path}: {WEIGHTS_FILE} cannot be read ({str(e).splitlines()[0]}); "
                       f"the file is truncated or damaged: re-run the train stage") from None
    if expected is not None:
        absent = [n for n in expected["tensors"] if n not in keys]
        if absent:
            raise LsrError(f"model folder {path}: {WEIGHTS_FILE} lacks tensor {absent[0]} ({len(absent)} absent); "
                           f"it was not written by lsr-run's save, or was changed after")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # what transformers would re-initialise is checked below, by name
    try:
        mlm = AutoModelForMaskedLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as e:
        raise LsrError(f"model folder {path} cannot be loaded: {str(e).splitlines()[0][:300]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    align(mlm)
    if expected is not None:
        _restore_ties(mlm, expected["tied"])
        _copy_from_file(mlm, path, sorted(expected["tensors"]))
        verify(mlm, expected, path)
    return mlm, tokenizer, settings


# ---------------------------------------------------------------- model card


def _metrics_table(metrics: dict) -> str:
    rows = {k: v for k, v in (metrics or {}).items() if isinstance(v, dict) and "ndcg@10" in v}
    if not rows:
        return "Not evaluated yet."
    names = sorted({m for v in rows.values() for m in v if "@" in m})
    lines = ["| dataset | " + " | ".join(names) + " | query terms | doc terms |",
             "|---" * (len(names) + 3) + "|"]
    for key, v in rows.items():
        cells = [f"{v[m]:.4f}" if isinstance(v.get(m), (int, float)) else "" for m in names]
        terms = [f"{v[t]:.1f}" if isinstance(v.get(t), (int, float)) else "" for t in ("query_terms", "doc_terms")]
        lines.append(f"| {key} | " + " | ".join(cells + terms) + " |")
    return "\n".join(lines)


def write_model_card(path: Path, config: dict | None = None, train: dict | None = None, metrics: dict | None = None,
                     meta: dict | None = None) -> None:
    """``README.md`` in the Hugging Face format: what the model is, how it was trained, how it scored."""
    path = Path(path)
    settings = json.loads((path / SETTINGS_FILE).read_text()) if (path / SETTINGS_FILE).exists() else {}
    config, train, meta = config or {}, train or {}, meta or {}
    scaling = settings.get("head_scaling") or {}
    data = (config.get("data") or {}).get("train") or {}
    tcfg = config.get("train") or {}
    git = meta.get("git") or {}
    versions = meta.get("packages") or {}
    base = settings.get("model_id", "")
    front = ["---", "library_name: sentence-transformers", "pipeline_tag: feature-extraction",
             "tags: [sparse-encoder, splade, learned-sparse-retrieval, lsr-run]"]
    if base and not base.startswith(("package:", "/", ".")) and not settings.get("tiny"):
        front.append(f"base_model: {base}")
    front.append("---")
    body = f"""
# SPLADE model trained with lsr-run

A learned sparse retrieval model: term weights are max over tokens of log(1 + relu(MLM logits)), one weight per
vocabulary entry, scored by dot product. Load it with

```python
from sentence_transformers import SparseEncoder
model = SparseEncoder("{path.name}")
```

or with lsr-run: `lsr-run stages=[encode,index,search,evaluate] model.path=<this folder>`.

## Model
| | |
|---|---|
| backbone | {settings.get('backbone', '')} (`{base}`) |
| MLM head | {'identity transform tied to the input embeddings, decoder bias ' + str(settings.get('headless_bias')) if settings.get('identity_head') else 'as loaded'} |
| head scaling | {scaling.get('method', 'none')} (factor {scaling.get('factor', 1.0):.6g}, target {scaling.get('target', '')}, tie {scaling.get('tie', '')}, inflate {scaling.get('inflate', 1.0)}) |
| decoder Frobenius norm after scaling | {scaling.get('decoder_norm', float('nan')):.2f} |

## Training
| | |
|---|---|
| data | {data.get('name', '')} ({data.get('split', '')}) |
| steps | {train.get('step', tcfg.get('max_steps', ''))} of batch {tcfg.get('batch_size', '')}, lr {tcfg.get('lr', '')} |
| loss / regularizer | {(config.get('loss') or {}).get('_target_', '').rsplit('.', 1)[-1]} / {(config.get('regularizer') or {}).get('_target_', '').rsplit('.', 1)[-1]} |
| sampling / teacher | {(config.get('sampling') or {}).get('_target_', '').rsplit('.', 1)[-1]} / {(config.get('teacher') or {}).get('_target_', '').rsplit('.', 1)[-1]} |
| seed | {config.get('seed', '')} |
| collapsed | {train.get('collapsed', False)} |

## Evaluation (nDCG@10 and the run's other metrics)
{_metrics_table(metrics or {})}

## Provenance
lsr-run {versions.get('lsr-run', '')}, commit {git.get('sha') or 'unknown'}{' (uncommitted changes)' if git.get('dirty') else ''};
torch {versions.get('torch', '')}, transformers {versions.get('transformers', '')}; lock {meta.get('lock', {}).get('sha256', 'none')[:12] if isinstance(meta.get('lock'), dict) else 'none'}.
"""
    (path / "README.md").write_text("\n".join(front) + "\n" + body)
