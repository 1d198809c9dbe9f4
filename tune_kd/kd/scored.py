"""A causal LM at its scored positions only, with its output layer applied a chunk of rows at a time.

Chat data scores only assistant tokens, and at a real vocabulary (Qwen2.5: 151,936 rows, Llama 3:
128,256) the output layer's logits dwarf everything else a small student holds: 4,096 scored
positions x 151,936 columns is 2.5 GB per tensor in fp32, and the loss math makes several. So a
model here never returns logits. ScoredLM runs the model's body, keeps the last hidden state at the
scored positions (N, H), and returns a Scored: that state plus the output layer, from which
losses.py projects CHUNK_ELEMENTS logits at a time (rows x vocabulary bounded, not rows alone), uses
and frees them. Peak memory then grows with the chunk, not with assistant tokens x vocabulary.

The model's own logit post-processing is reapplied to each chunk: a scale (Cohere's logit_scale,
Granite's 1/logits_scaling), then soft-capping (Gemma 2/3's final_logit_softcapping). On its first
forward ScoredLM checks that hidden state -> output layer -> post-processing reproduces the model's
own logits on a few positions; a model that computes them some other way takes the full path (the
model's logits at the scored positions, materialised), with the reason logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tune_kd.model.build import moe_settings

log = logging.getLogger(__name__)

# Logits per chunk (rows x vocabulary): 4.2M, 16 MB per fp32 intermediate; 27 rows at V = 151,936,
# 655 at MiniMind's 6,400. bench/vocab_memory.py --chunk-elements on the 2-core CPU at V = 151,936
# (4,096 positions, bf16): 2^22 10.2 s / 0.56 GiB, 2^23 7.0 s / 0.90 GiB, 2^24 15.4 s / 0.93 GiB,
# 2^25 16.7 s / 1.38 GiB per step (the full logits: 35.3 s / 8.26 GiB). Memory decides: a search on
# a 151,936-id world with 2 trials at once peaked at 3.75 GB over all its processes at 2^22, 4.52 GB
# at 2^23, for 472 s against 409 s of wall time.
CHUNK_ELEMENTS = 1 << 22


def chunk_rows(vocab: int, elements: int | None = None) -> int:
    """Rows per chunk at this vocabulary: rows x vocab stays within `elements` (CHUNK_ELEMENTS)."""
    return max(1, (elements or CHUNK_ELEMENTS) // max(vocab, 1))


def row_chunks(rows: int, vocab: int, elements: int | None = None):
    """(lo, hi) spans covering rows 0..rows in chunks of chunk_rows(vocab, elements)."""
    step = chunk_rows(vocab, elements)
    return [(lo, min(rows, lo + step)) for lo in range(0, rows, step)]


# On a CPU in bf16 or fp16, oneDNN prepares (and keeps) its matmul kernels and packed weights for
# every new shape it sees, so a trial's memory grows with the number of distinct batch shapes: ~10 MB
# a step at V = 151,936 with length-bucketed batches, until every shape had been seen. There the
# shapes are kept few: sequences padded on the right to a multiple of SEQUENCE_MULTIPLE (causal
# attention: the real tokens' outputs do not change), and every chunk's matmuls padded to one height.
SEQUENCE_MULTIPLE = 16


def few_shapes(tensor: torch.Tensor) -> bool:
    """Whether matmuls on `tensor` go through oneDNN's per-shape kernels: a CPU tensor in bf16/fp16,
    or any CPU tensor under bf16/fp16 autocast."""
    if tensor.device.type != "cpu":
        return False
    low = (torch.bfloat16, torch.float16)
    return tensor.dtype in low or torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in low


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` (n, ...) zero-padded to `rows` rows where the matmul shape matters (few_shapes)."""
    n = tensor.shape[0]
    if n >= rows or not few_shapes(tensor):
        return tensor
    return F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, rows - n))


@dataclass
class Scored:
    """A model's output at N scored positions, kept before its output layer.

    hidden: (N, H) last hidden states; weight (V, H) / bias (V,): the output layer's; logits(lo, hi)
    -> (hi - lo, V) fp32, the model's logits of those rows. On the full path hidden is the (N, V)
    logits themselves and weight is None. compute_dtype: the autocast dtype the model ran under
    (the projection runs in it too), None for none."""

    hidden: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    compute_dtype: torch.dtype | None = None

    @classmethod
    def of_logits(cls, logits: torch.Tensor) -> "Scored":
        """Logits already materialised (N, V): the full path, and tests."""
        return cls(logits, None)

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab(self) -> int:
        return self.hidden.shape[1] if self.weight is None else self.weight.shape[0]

    def project(self, hidden: torch.Tensor, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits (n, V) of hidden rows (n, H) through the output layer (this one's unless given),
        in the compute dtype; on the full path `hidden` already is the logits."""
        weight = self.weight if weight is None else weight
        if weight is None:
            return hidden
        bias = self.bias if bias is None else bias
        if self.compute_dtype is not None:
            cast = lambda t: None if t is None else t.to(self.compute_dtype)  # noqa: E731
            hidden, weight, bias = cast(hidden), cast(weight), cast(bias)
        rows = hidden.shape[0]
        return F.linear(pad_rows(hidden, chunk_rows(weight.shape[0])), weight, bias)[:rows]

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        """The model's post-processing of raw logits, in fp32: scale, then soft-capping."""
        logits = raw.float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def logits(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """(hi - lo, V) fp32 logits of rows lo:hi (differentiable when the inputs are)."""
        return self.finish(self.project(self.hidden[lo:hi]))


def logit_recipe(config) -> tuple[float, float | None]:
    """(scale, soft-cap) the model applies to its output layer's logits, from its config."""
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        scale /= float(scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, float(softcap) if softcap else None


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


HEAD_CHECK_POSITIONS = 8     # positions the first forward compares against the model's own logits
HEAD_CHECK_TOLERANCE = 2e-2  # relative to the logits' scale: bf16 rounding passes, a wrong recipe does not


class ScoredLM(torch.nn.Module):
    """Runs a causal LM and returns its output at the scored positions only, as a Scored.

    forward(input_ids (B, T), positions (B, T) bool) -> (Scored (N rows), features, router_aux).
    features: with feature_layers (feature distillation) the hidden states (N, H) of those layers,
    through `projector` when given (the student's side; a submodule, so DDP syncs it), else None.
    router_aux: a mixture-of-experts model's load-balancing loss (already times its
    router_aux_loss_coef), else None.
    """

    def __init__(self, lm: torch.nn.Module, feature_layers: tuple[int, ...] = (), projector=None):
        super().__init__()
        self.lm, self.feature_layers, self.projector = lm, tuple(feature_layers), projector
        self.scale, self.softcap = logit_recipe(lm.config)
        self.full_path: bool | None = None          # decided on the first forward (check_head)
        self.moe = moe_settings(lm.config)

    def check_head(self, input_ids: torch.Tensor) -> bool:
        """Whether body -> output layer -> logit_recipe reproduces the model's own logits on a few
        positions of input_ids (in eval mode, without grad); logs the full path when not."""
        head = self.lm.get_output_embeddings()
        if not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
            log.info("model %s: its output layer is not a plain linear layer: logits are materialised (full path)",
                     type(self.lm).__name__)
            return False
        probe = input_ids[:1, :HEAD_CHECK_POSITIONS]
        was_training = self.lm.training
        self.lm.eval()
        try:   # eager: a check must not add a graph to compiled layers (compiling.py counts them)
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                own = self.lm(input_ids=probe, use_cache=False).logits[0].float()
                body = self.lm.base_model(input_ids=probe, use_cache=False).last_hidden_state[0]
                ours = Scored(body, head.weight, getattr(head, "bias", None), self.scale, self.softcap,
                              _autocast_dtype(probe.device)).logits()
        finally:
            self.lm.train(was_training)
        error = float((ours - own).abs().max()) / max(float(own.abs().max()), 1.0)
        if error > HEAD_CHECK_TOLERANCE:
            log.info("model %s: its logits are not output layer x hidden state (scale %g, soft-cap %s; relative "
                     "difference %.3g): logits are materialised (full path)", type(self.lm).__name__, self.scale,
                     self.softcap, error)
            return False
        return True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor):
        if self.full_path is None:
            self.full_path = not self.check_head(input_ids)
        extra = -input_ids.shape[1] % SEQUENCE_MULTIPLE if few_shapes(input_ids) else 0
        if extra:   # right padding, never scored: the same rows come out
            input_ids, positions = F.pad(input_ids, (0, extra)), F.pad(positions, (0, extra))
        wants = {"use_cache": False}   # no KV cache to fill: it costs memory, and recompiles compiled layers
        if self.feature_layers:
            wants["output_hidden_states"] = True
        if self.moe is not None and self.training:
            wants["output_router_logits"] = True
        if self.full_path:
            out = self.lm(input_ids=input_ids, **wants)
            scored = Scored.of_logits(out.logits[positions])                                  # (N, V)
        else:
            out = self.lm.base_model(input_ids=input_ids, **wants)
            head = self.lm.get_output_embeddings()
            scored = Scored(out.last_hidden_state[positions], head.weight, getattr(head, "bias", None),   # (N, H)
                            self.scale, self.softcap, _autocast_dtype(input_ids.device))
        features = None
        if self.feature_layers:
            features = [out.hidden_states[layer][positions] for layer in self.feature_layers]
            features = self.projector(features) if self.projector is not None else features
        router_aux = None
        if wants.get("output_router_logits"):
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            experts, top_k, coef = self.moe
            router_aux = coef * load_balancing_loss_func(out.router_logits, experts, top_k)
        return scored, features, router_aux
