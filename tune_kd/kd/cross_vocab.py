"""Distillation between a teacher and a student whose tokenizers differ: group merging, ULD, GOLD's
hybrid and X-Token's projection losses; pure functions, fp32 math, each returning a *sum* over groups.

Upstream aligns both renderings of a reply by UTF-8 byte offsets into *groups*: a run of student
tokens and a run of teacher tokens that end on the same byte. Each side gives its log-softmax rows
at temperature T that predict the scored tokens (row i predicts targets[i], causal convention), the
targets and a group id per row. merge_groups turns a group's rows into one distribution by the chain
rule (TRL GOLD's "bayesian" merge); the losses compare a chunk's (G, Vs) student and (G, Vt) teacher
merged rows. Merged rows are unnormalised: a row is P(the group's earlier tokens, then v) over v,
summing to the earlier tokens' probability (<= 1). Index tensors follow the rows: vocab.to(device).

    uld          ULD: L1 between the descending-sorted probability vectors (token identity ignored)
    gold_hybrid  GOLD: TRL's generalised JSD on the columns both vocabularies spell identically,
                 ULD on the rest, weighted by the matched share of the teacher vocabulary
    pkl          X-Token P-KL: the student's distribution projected into the teacher's vocabulary
                 through a sparse W (Vs x Vt), renormalised, KL(teacher || projected student)
    hkl          X-Token H-KL: GOLD's partition relaxed through W (hkl_sum defines it)

The caller divides by the number of groups in its window (TRL's per-sample value is sum / G) and
multiplies by T^k, k = CROSS_VOCAB_TEMPERATURE_POWER. X-Token (Turuvekere Sreenivas et al., NVIDIA,
arXiv 2605.21699): only the paper's abstract and published summaries could be read here, not its
method section. They give W as sparse, built once from tokenizer string rules (exact matches; a
token spanning several teacher tokens spread over them with exponentially decaying weights), P-KL
as the partition-free KL through W (for critical tokens GOLD leaves unmatched, e.g. packed
numerals under a digit-splitting teacher), H-KL as the hybrid with each student token matched to its
top-ranked teacher token under W (for pairs whose partition is sound). The decay 1/2, the 4-piece
cap, H-KL's exact formula and the audit's thresholds are this module's choices, said where built.
match_vocabularies builds the VocabMatch (exact pairs and W) from the tokenizers alone;
coverage_audit and recommended_method say which loss fits a tokenizer pair.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

EPS = 1e-8                  # TRL's probability clamp (merging and GOLD's matched JSD): log(max(p, EPS))
LOG_EPS = math.log(EPS)
MAX_PIECES = 4              # teacher pieces a re-tokenised student token keeps in W
DECAY = 0.5                 # piece k's weight in W is DECAY^k before the row is normalised


def merge_groups(logp: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Merged log-probabilities of G groups by the chain rule: (G, V) fp32, differentiable.

    logp: (n, V) log-softmax rows at temperature T, row i predicting targets[i]; targets: (n,);
    groups: (n,) int64 group id per row, 0..G-1 with every group owning >= 1 row, -1 for rows in no
    group. A group's rows i..j (j its last row) give

        log P = logp[j] + sum_{i <= k < j} log(max(exp(logp[k, targets[k]]), 1e-8)),

    the full distribution at the last row (conditioned on the actual earlier tokens) times the scalar
    probabilities of those earlier tokens, clamped as TRL does. This is TRL's "bayesian" strategy;
    its default "observed" reads the first row instead, i.e. the distribution of the group's first
    token, times probabilities read from the rows that predict the *next* tokens.
    """
    logp = logp.float()
    rows = torch.arange(logp.shape[0], device=logp.device)
    scored = groups >= 0
    group = groups.clamp_min(0)
    last = torch.full((num_groups,), -1, dtype=torch.long, device=logp.device)
    last = last.scatter_reduce(0, group, torch.where(scored, rows, -1), reduce="amax")         # (G,)
    earlier = scored & (rows != last[group])
    picked = logp.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1).clamp_min(LOG_EPS)  # (n,)
    # each group's earlier tokens' log-probabilities; where() keeps the last rows' and -1 rows' out
    prefix = logp.new_zeros(num_groups).index_add(0, group, torch.where(earlier, picked, 0.0))
    return logp[last] + prefix.unsqueeze(1)


def _sorted_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum |sort(a) - sort(b)| over rows, both sorted descending, the narrower zero-padded: (G, m), (G, n)."""
    a = a.sort(dim=-1, descending=True).values
    b = b.sort(dim=-1, descending=True).values
    width = max(a.shape[-1], b.shape[-1])
    return (F.pad(a, (0, width - a.shape[-1])) - F.pad(b, (0, width - b.shape[-1]))).abs().sum()


def _partial_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """_sorted_l1 on the columns left out of a partition; 0 when either side has none (as TRL's hybrid)."""
    if a.shape[-1] == 0 or b.shape[-1] == 0:
        return a.new_zeros(())
    return _sorted_l1(a, b)


def uld_sum(student_merged_logp: torch.Tensor, teacher_merged_logp: torch.Tensor, vocab=None, **_) -> torch.Tensor:
    """Universal Logit Distillation summed over groups: per group the L1 distance between the student's
    and the teacher's merged probability vectors sorted descending, the shorter zero-padded. (G, Vs), (G, Vt)."""
    return _sorted_l1(student_merged_logp.float().exp(), teacher_merged_logp.float().exp())


def _generalized_jsd(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalized_jsd_loss bracket, summed: beta * KL(t || m) + (1 - beta) * KL(s || m) with
    m = beta * t + (1 - beta) * s; beta 0 is KL(t || s), beta 1 is KL(s || t). Logs of possibly
    unnormalised masses, through F.kl_div (exp(target) * (target - input)) as TRL computes it."""
    if beta == 0:
        return F.kl_div(log_s, log_t, reduction="sum", log_target=True)
    if beta == 1:
        return F.kl_div(log_t, log_s, reduction="sum", log_target=True)
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    return beta * F.kl_div(log_m, log_t, reduction="sum", log_target=True) + \
        (1 - beta) * F.kl_div(log_m, log_s, reduction="sum", log_target=True)


def _mask(ids: torch.Tensor, width: int) -> torch.Tensor:
    mask = torch.zeros(width, dtype=torch.bool, device=ids.device)
    mask[ids] = True
    return mask


def gold_hybrid_sum(student_merged_logp: torch.Tensor, teacher_merged_logp: torch.Tensor, vocab: VocabMatch,
                    beta: float = 0.5, **_) -> torch.Tensor:
    """TRL GOLD's hybrid ULD summed over groups, adaptive weights (TRL's default):

        w * JSD_beta(matched) + (1 - w) * ULD(unmatched),   w = matched pairs / Vt (the teacher's width).

    matched: the columns vocab pairs (identical get_vocab strings), compared as TRL's
    generalized_jsd_loss(..., logits_are_probs=True): logs of the unnormalised merged probabilities
    clamped at 1e-8, beta weighing the teacher in the mixture, beta 0 / 1 the plain KL(teacher ||
    student) / KL(student || teacher). That is the bracket beta KL(t||m) + (1-beta) KL(s||m) *without*
    kd.losses.jsd_sum's 1 / (beta (1 - beta)) rescaling: TRL's definition here, so values compare with
    GOLD's. unmatched: each side's remaining columns, sorted L1 as uld_sum; 0 when either side has none.
    Pair ids must lie below the widths (G, Vs), (G, Vt).
    """
    s, t = student_merged_logp.float(), teacher_merged_logp.float()
    vocab = vocab.to(s.device)
    matched = _generalized_jsd(s[:, vocab.student_ids].clamp_min(LOG_EPS),
                               t[:, vocab.teacher_ids].clamp_min(LOG_EPS), beta)
    unmatched = _partial_l1(s[:, ~_mask(vocab.student_ids, s.shape[-1])].exp(),
                            t[:, ~_mask(vocab.teacher_ids, t.shape[-1])].exp())
    weight = vocab.teacher_ids.numel() / max(1, t.shape[-1])
    return weight * matched + (1 - weight) * unmatched


def project(student_probs: torch.Tensor, vocab: VocabMatch, teacher_width: int) -> torch.Tensor:
    """q_S @ W: (G, Vs) student mass -> (G, Vt), each student token's mass spread over its W row
    (vocab's tensors on the mass's device)."""
    spread = student_probs[:, vocab.proj_student] * vocab.proj_weight                     # (G, nnz)
    return student_probs.new_zeros(student_probs.shape[0], teacher_width).index_add(1, vocab.proj_teacher, spread)


def _kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q); a column with p = 0 adds 0 (where() keeps 0 * -inf out of value and gradient)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum()


def pkl_sum(student_merged_logp: torch.Tensor, teacher_merged_logp: torch.Tensor, vocab: VocabMatch,
            **_) -> torch.Tensor:
    """X-Token P-KL summed over groups: no partition; the student's merged distribution is carried into
    the teacher's vocabulary by W, q_T = q_S @ W, and per group

        KL(p || q) = sum_t p_t (log p_t - log max(q_t, 1e-8)),   p = p_T / sum p_T, q = q_T / sum q_T,

    both renormalised (merged rows are unnormalised; the scale of each cancels). The floor bounds
    teacher columns no student token reaches (q_t = 0); they carry no gradient. (G, Vs), (G, Vt).
    """
    s, t = student_merged_logp.float(), teacher_merged_logp.float()
    vocab = vocab.to(s.device)
    # shift by the row's max before exp: a long group's product can sit near fp32's underflow
    q = project((s - s.amax(-1, keepdim=True).detach()).exp(), vocab, t.shape[-1])
    logq = torch.log((q / q.sum(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)).clamp_min(EPS))
    return _kl_terms(torch.log_softmax(t, dim=-1), logq)


def hkl_sum(student_merged_logp: torch.Tensor, teacher_merged_logp: torch.Tensor, vocab: VocabMatch,
            **_) -> torch.Tensor:
    """X-Token H-KL summed over groups: GOLD's hybrid with its 1-to-1 matching relaxed through W.

    Each student token s with a W row is paired with its top-ranked teacher token top(s) (its exact
    match, else the first piece of its re-tokenised text: the heaviest under the decaying weights).
    R = {top(s)} are the reached teacher columns; the student's mass on R is q_R[t] = sum of q_S[s]
    over top(s) = t (several student tokens may share one teacher column). With p and q_S the
    unnormalised merged probabilities and w = |R| / Vt:

        H-KL = w * sum_{t in R} p'_t (log p'_t - log q'_t)  +  (1 - w) * ULD(p on columns not in R,
                                                                          q_S on tokens without a row),
        p' = max(p, 1e-8), q' = max(q_R, 1e-8),

    the KL in GOLD's matched convention (clamped logs of unnormalised masses, TRL's beta = 0), the ULD
    part as GOLD's unmatched one (0 when either side is empty, as it is when every student token has a
    row). With W holding only the exact pairs this is gold_hybrid_sum at beta = 0. (G, Vs), (G, Vt).
    """
    s, t = student_merged_logp.float(), teacher_merged_logp.float()
    vocab = vocab.to(s.device)
    top = vocab.top_teacher[:s.shape[-1]]
    has_row = top >= 0
    reached = _mask(top[has_row], t.shape[-1])
    q_s = s.exp()
    q_r = q_s.new_zeros(q_s.shape[0], t.shape[-1]).index_add(1, top.clamp_min(0), q_s * has_row)
    kl = F.kl_div(torch.log(q_r[:, reached].clamp_min(EPS)), t[:, reached].clamp_min(LOG_EPS),
                  reduction="sum", log_target=True)
    unreached = _partial_l1(q_s[:, ~has_row], t[:, ~reached].exp())
    weight = int(reached.sum()) / max(1, t.shape[-1])
    return weight * kl + (1 - weight) * unreached


@dataclass(frozen=True)
class VocabMatch:
    """How two vocabularies correspond, from the tokenizers alone (match_vocabularies).

    Exact pairs (TRL GOLD's rule: identical get_vocab strings) for gold_hybrid, and X-Token's sparse
    projection W (Vs x Vt) as COO entries for pkl / hkl, with each student token's top-ranked teacher
    id. Ids must lie below the widths of the merged rows the losses get."""

    student_ids: torch.Tensor     # (M,) int64: the student id of each identically spelled pair,
    teacher_ids: torch.Tensor     # (M,) int64: ... and its teacher id; pairs sorted by teacher id
    student_size: int             # ids the student tokenizer knows (max id + 1)
    teacher_size: int
    proj_student: torch.Tensor    # (nnz,) int64: W's entries, row (student id),
    proj_teacher: torch.Tensor    # (nnz,) int64: column (teacher id),
    proj_weight: torch.Tensor     # (nnz,) fp32: weight; a row with entries sums to 1
    top_teacher: torch.Tensor     # (Vs,) int64: each row's heaviest column (first listed on a tie), -1: no row

    def to(self, device) -> VocabMatch:
        """The same match with its tensors on `device` (no copy where they already are)."""
        return replace(self, **{name: getattr(self, name).to(device) for name in
                                ("student_ids", "teacher_ids", "proj_student", "proj_teacher", "proj_weight",
                                 "top_teacher")})

    def projection(self) -> torch.Tensor:
        """W as a coalesced sparse COO tensor (Vs, Vt) (repeated pieces of one token summed)."""
        return torch.sparse_coo_tensor(torch.stack([self.proj_student, self.proj_teacher]), self.proj_weight,
                                       (self.student_size, self.teacher_size),
                                       check_invariants=True).coalesce()


def with_projection(match: VocabMatch, rows, cols, weights) -> VocabMatch:
    """`match` with W replaced by the entries (rows: student ids, cols: teacher ids, weights), each
    row's weights normalised to sum 1, and top_teacher recomputed."""
    rows, cols = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    weights = torch.as_tensor(weights, dtype=torch.float32)
    n, size = rows.numel(), match.student_size
    weights = weights / torch.zeros(size).index_add(0, rows, weights)[rows]
    # top: per row, the first-listed entry among those of the row's largest weight (no loop over rows)
    best = torch.zeros(size).scatter_reduce(0, rows, weights, reduce="amax")
    position = torch.where(weights == best[rows], torch.arange(n), n)
    first = torch.full((size,), n).scatter_reduce(0, rows, position, reduce="amin")
    top = torch.where(first < n, cols[first.clamp_max(n - 1)], -1) if n else torch.full((size,), -1)
    return replace(match, proj_student=rows, proj_teacher=cols, proj_weight=weights, top_teacher=top)


def _special_ids(tokenizer) -> set[int]:
    """The tokenizer's special tokens: bos/eos/pad/..., and every added token marked special (the chat
    template's markers: <|im_start|>, <|eot_id|>, <start_of_turn>, ...)."""
    return set(tokenizer.all_special_ids) | {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}


def _token_texts(tokenizer, ids: list[int]) -> list[str | None]:
    """Each id's text, or None where it has none a tokenizer could re-read: empty, or a partial UTF-8
    sequence (a byte-level token decodes to U+FFFD). SentencePiece drops a lone token's leading '▁'
    when decoding; it is put back as the space it stands for."""
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    out = []
    for text, piece in zip(texts, tokenizer.convert_ids_to_tokens(ids)):
        if piece and piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        out.append(None if not text or "\ufffd" in text else text)
    return out


def match_vocabularies(student_tokenizer, teacher_tokenizer, max_pieces: int = MAX_PIECES,
                       decay: float = DECAY) -> VocabMatch:
    """Exact pairs and X-Token's projection W from two tokenizers (this module's reading of the paper's
    string rules). A student token spelled as a teacher token maps to it with weight 1. Otherwise its
    text is re-tokenised by the teacher (no special tokens added) and its first `max_pieces` pieces get
    weights 1, decay, decay^2, ... normalised to sum 1: "201" -> "2", "0", "1" at 4/7, 2/7, 1/7. An
    unmatched special token has no row (its text spelt out is not its meaning), except the student's
    eos, which maps to the teacher's; so has a token without re-readable text (_token_texts). A token
    without a row moves no mass in P-KL and joins the unreached side in H-KL."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    pairs = sorted((tid, student_vocab[text]) for text, tid in teacher_vocab.items() if text in student_vocab)
    sizes = [max(len(tok), max(vocab.values()) + 1) for tok, vocab in
             ((student_tokenizer, student_vocab), (teacher_tokenizer, teacher_vocab))]
    empty = torch.zeros(0, dtype=torch.long)
    match = VocabMatch(torch.tensor([s for _, s in pairs], dtype=torch.long).reshape(-1),
                       torch.tensor([t for t, _ in pairs], dtype=torch.long).reshape(-1), *sizes,
                       empty, empty, empty.float(), torch.full((sizes[0],), -1))
    rows, cols, weights = [s for _, s in pairs], [t for t, _ in pairs], [1.0] * len(pairs)
    matched, special = set(rows), _special_ids(student_tokenizer)
    eos, teacher_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    if eos is not None and teacher_eos is not None and eos not in matched:
        rows, cols, weights = rows + [eos], cols + [teacher_eos], weights + [1.0]
    todo = sorted(i for i in set(student_vocab.values()) if i not in matched and i not in special)
    readable = [(i, text) for i, text in zip(todo, _token_texts(student_tokenizer, todo)) if text is not None]
    pieces = teacher_tokenizer([text for _, text in readable], add_special_tokens=False)["input_ids"] \
        if readable else []
    for (i, _), ids in zip(readable, pieces):
        kept = ids[:max_pieces]
        rows.extend([i] * len(kept))
        cols.extend(kept)
        weights.extend(decay ** k for k in range(len(kept)))
    return with_projection(match, rows, cols, weights)


# token categories a model cannot afford to lose to GOLD's unmatched, rank-matched side
CRITICAL = ("numeral", "digit", "whitespace", "punctuation")
CATEGORIES = CRITICAL + ("special",)


def _category(text: str | None, special: bool) -> str | None:
    """numeral (>= 2 ASCII digits, a leading/trailing space allowed), digit, whitespace (spaces,
    tabs, newlines), punctuation (ASCII), special; None for anything else."""
    if special:
        return "special"
    core = (text or "").strip()
    if core.isascii() and core.isdigit():
        return "numeral" if len(core) > 1 else "digit"
    if text and text.isspace():
        return "whitespace"
    return "punctuation" if core and all(c in string.punctuation for c in core) else None


def _side_audit(tokenizer, matched: set[int], projected: set[int]) -> dict:
    """{category: {total, matched, projected (reached through W only), unreached}} over one vocabulary."""
    ids = sorted(set(tokenizer.get_vocab().values()))
    special = _special_ids(tokenizer)
    counts = {c: {"total": 0, "matched": 0, "projected": 0, "unreached": 0} for c in CATEGORIES}
    for i, text in zip(ids, tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)):
        category = _category(text, i in special)
        if category is not None:
            status = "matched" if i in matched else "projected" if i in projected else "unreached"
            counts[category]["total"] += 1
            counts[category][status] += 1
    return counts


def coverage_audit(student_tokenizer, teacher_tokenizer, vocab: VocabMatch) -> dict:
    """Per critical category, how each side's tokens fare: exactly matched (GOLD's matched columns),
    reached through W only (student: has a W row; teacher: a column of W), or unreached.
    Returns {"student": {category: counts}, "teacher": {...}, "vocab": whole-vocabulary counts}."""
    has_row = set(vocab.proj_student.tolist())
    student_matched, teacher_matched = set(vocab.student_ids.tolist()), set(vocab.teacher_ids.tolist())
    student = _side_audit(student_tokenizer, student_matched, has_row)
    teacher = _side_audit(teacher_tokenizer, teacher_matched, set(vocab.proj_teacher.tolist()))
    total = len(set(student_tokenizer.get_vocab().values()))
    return {"student": student, "teacher": teacher,
            "vocab": {"student": total, "teacher": len(set(teacher_tokenizer.get_vocab().values())),
                      "matched": len(student_matched), "projected_only": len(has_row - student_matched),
                      "unreached": total - len(has_row | student_matched)}}


def _recommendation(audit: dict) -> tuple[str, str]:
    """(method, reason). A critical category (either side) mostly unmatched (< 50% exactly matched)
    puts those tokens in GOLD's rank-matched part, where their identity is lost and the matched KL's
    normalisation suppresses them (X-Token's uncommon-token failure): remove the partition, pkl. Else,
    when W reaches >= 10% of the student vocabulary beyond the exact pairs, the partition holds but is
    over-conservative: relax it, hkl. Else GOLD's partition is sound: gold_hybrid."""
    for side in ("student", "teacher"):
        for category in CRITICAL:
            c = audit[side][category]
            if c["total"] and c["matched"] < 0.5 * c["total"]:
                return "pkl", (f"{c['matched']}/{c['total']} {side} {category} tokens spelled alike, so GOLD would "
                               f"rank-match the rest")
    share = audit["vocab"]["projected_only"] / max(1, audit["vocab"]["student"])
    if share >= 0.10:
        return "hkl", f"critical tokens match, and W pairs {share:.0%} more of the student vocabulary"
    return "gold_hybrid", f"critical tokens match, and W pairs only {share:.0%} more of the student vocabulary"


def recommended_method(audit: dict) -> str:
    """"gold_hybrid" | "hkl" | "pkl" for a coverage_audit (the rule: _recommendation)."""
    return _recommendation(audit)[0]


def describe_audit(audit: dict) -> str:
    """One line for the user: the coverage and the recommended loss with its reason."""
    v = audit["vocab"]
    cats = ", ".join(f"{c} {s['matched']}/{s['projected']}/{s['unreached']}"
                     for c, s in audit["student"].items() if s["total"])
    method, reason = _recommendation(audit)
    return (f"cross-vocab: {v['matched']} of {v['student']} student tokens spelled as the teacher's, "
            f"{v['projected_only']} more reached through W, {v['unreached']} unreached (by category, "
            f"matched/W/unreached: {cats}); recommended loss {method}: {reason}")


# name -> summed loss(student (G, Vs), teacher (G, Vt) merged log-probabilities, vocab=VocabMatch, beta=...)
CROSS_VOCAB_LOSSES = {"uld": uld_sum, "gold_hybrid": gold_hybrid_sum, "pkl": pkl_sum, "hkl": hkl_sum}

# name -> k of the objective's T^k factor (kd.losses derives the rule: the power of 1/T at which the
# student gradient shrinks at large T). ULD's L1 has a gradient of +-1 per column however close the
# sorted vectors are, so it shrinks as 1/T only: k = 1, as for tvd. gold_hybrid mixes that L1 with a
# JSD (1/T^2): k = 1 keeps the L1 part's scale, where T^2 would grow its gradient with T. P-KL is a KL
# (k = 2); H-KL's student gradient is its KL part (its L1 part only sees student tokens W does not
# reach, in practice none), so k = 2.
CROSS_VOCAB_TEMPERATURE_POWER = {"uld": 1, "gold_hybrid": 1, "pkl": 2, "hkl": 2}
