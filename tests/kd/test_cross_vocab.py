"""Cross-vocabulary losses: pinned against TRL 1.16's GOLD ULDLoss (value and gradient), and their properties.

Two tiny byte-level BPE tokenizers stand in for a teacher/student pair of different families: the
student packs numerals ("201" one token) and has a small vocabulary (words split into pieces); the
teacher splits digits and has a larger one. They share most single characters and common words, so
GOLD's hybrid has both matched and unmatched columns, and the byte alignment has groups of 1-4
tokens on either side.
"""

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")   # trl.experimental warns on import otherwise
from trl.experimental.gold.gold_config import GOLDConfig  # noqa: E402
from trl.experimental.gold.gold_trainer import GOLDTrainer, ULDLoss  # noqa: E402

from tune_kd.kd import cross_vocab as cv  # noqa: E402
from tune_kd.kd.cross_vocab import (CROSS_VOCAB_LOSSES, CROSS_VOCAB_TEMPERATURE_POWER, VocabMatch,  # noqa: E402
                                    merge_groups)
from tune_kd.kd.losses import jsd_sum  # noqa: E402

CORPUS = ["The answer is 201 and 45 plus 12 makes 57.", "Hello, how are you today? I am fine, thanks.",
          "Sorting the numbers 321, 120 and 999 gives 120, 321, 999.", "one line\ntwo lines\n\nthree lines\n",
          "Distillation between tokenizers that disagree on numbers."] * 8
ANSWERS = ["The answer is 201, then 45 plus 12.\nthanks", "Sorting 321 and 120 gives 120, 321."]


def bpe(vocab_size: int, split_digits: bool, special: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if split_digits else byte_level
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=special[-1])


@pytest.fixture(scope="module")
def pair():
    """(student: packs numerals, small; teacher: splits digits, larger, its own special tokens)."""
    return bpe(300, False, ["<|endoftext|>", "<|im_end|>"]), bpe(420, True, ["<|end_of_text|>", "<|eot_id|>"])


@pytest.fixture(scope="module")
def match(pair):
    return cv.match_vocabularies(*pair)


def group_ids(s_ends: list[int], t_ends: list[int]) -> tuple[list[int], list[int], int]:
    """Group ids per token on each side: a group closes where both sides' tokens end on the same byte."""
    s_groups, t_groups, g, i, j = [], [], 0, 0, 0
    while i < len(s_ends) and j < len(t_ends):
        if s_ends[i] <= t_ends[j]:
            s_groups.append(g)
        if t_ends[j] <= s_ends[i]:
            t_groups.append(g)
        closes = s_ends[i] == t_ends[j]
        i, j = (i + 1, j + 1) if closes else (i + 1, j) if s_ends[i] < t_ends[j] else (i, j + 1)
        g += closes
    assert i == len(s_ends) and j == len(t_ends), "both renderings end on the same byte"
    return s_groups, t_groups, g


def batch(pair, answers, seed=0, pads=(3, 5)):
    """Both sides as TRL's ULDLoss takes them (prompt, answer, padding; labels on the answer only) and
    as this module takes them (per sample: answer ids, the rows that predict them, group ids)."""
    g = torch.Generator().manual_seed(seed)
    side = {}
    for name, tok, prompt, pad in (("s", pair[0], 2, pads[0]), ("t", pair[1], 3, pads[1])):
        encoded = [tok(a, add_special_tokens=False, return_offsets_mapping=True) for a in answers]
        length = prompt + max(len(e.input_ids) for e in encoded) + 2
        ids = torch.randint(0, len(tok), (len(answers), length), generator=g)
        labels = torch.full_like(ids, -100)
        offsets = torch.zeros(len(answers), length, 2, dtype=torch.long)
        for b, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[b, prompt:prompt + n] = labels[b, prompt:prompt + n] = torch.tensor(e.input_ids)
            offsets[b, prompt:prompt + n] = torch.tensor(e.offset_mapping)   # ASCII: characters are bytes
        logits = (torch.randn(len(answers), length, len(tok) + pad, generator=g) * 3).requires_grad_(name == "s")
        side[name] = dict(ids=ids, labels=labels, offsets=offsets, logits=logits, prompt=prompt,
                          answers=[e.input_ids for e in encoded], ends=[[o[1] for o in e.offset_mapping]
                                                                        for e in encoded])
    return side


def trl_value(pair, side, temperature, hybrid, beta, tmp_path):
    config = GOLDConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_uld_loss=True,
                        uld_token_merge_strategy="bayesian", uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, use_extended_uld=True,
                        uld_student_temperature=temperature, uld_teacher_temperature=temperature,
                        uld_use_hybrid_loss=hybrid, beta=beta)
    s, t = side["s"], side["t"]
    return ULDLoss(config, student_tokenizer=pair[0], teacher_tokenizer=pair[1])(
        s["logits"], t["logits"], s["labels"], t["labels"], s["ids"], t["ids"],
        student_byte_offsets=s["offsets"], teacher_byte_offsets=t["offsets"])


def our_value(side, temperature, loss, vocab, beta):
    """Mean over samples of loss sum / groups, as TRL reduces."""
    s, t = side["s"], side["t"]
    values = []
    for b in range(len(s["answers"])):
        s_groups, t_groups, groups = group_ids(s["ends"][b], t["ends"][b])
        merged = []
        for x, grouping in ((s, s_groups), (t, t_groups)):
            n = len(x["answers"][b])
            rows = x["logits"][b, x["prompt"] - 1:x["prompt"] - 1 + n]       # row k predicts answer token k
            merged.append(merge_groups(F.log_softmax(rows / temperature, dim=-1), torch.tensor(x["answers"][b]),
                                       torch.tensor(grouping), groups))
        values.append(CROSS_VOCAB_LOSSES[loss](*merged, vocab=vocab, beta=beta) / groups)
    return torch.stack(values).mean()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("loss, temperature, answers, beta", [
    ("uld", 1.0, ANSWERS[:1], 0.5), ("uld", 2.5, ANSWERS, 0.5),
    ("gold_hybrid", 1.0, ANSWERS[:1], 0.5), ("gold_hybrid", 2.5, ANSWERS, 0.3),
    ("gold_hybrid", 2.0, ANSWERS, 0.0), ("gold_hybrid", 0.7, ANSWERS, 1.0)])
def test_equals_trl_gold_value_and_gradient(pair, match, tmp_path, loss, temperature, answers, beta):
    side = batch(pair, answers)
    assert max(max(group_ids(*ends)[0].count(g) for g in range(group_ids(*ends)[2]))
               for ends in zip(side["s"]["ends"], side["t"]["ends"])) >= 3        # split words merge 3+ rows
    expected = trl_value(pair, side, temperature, loss == "gold_hybrid", beta, tmp_path)
    (expected_grad,) = torch.autograd.grad(expected, side["s"]["logits"])
    ours = our_value(side, temperature, loss, match, beta)
    (grad,) = torch.autograd.grad(ours, side["s"]["logits"])
    assert relative(ours, expected) < 1e-5
    assert relative(grad, expected_grad) < 1e-5
    assert expected_grad.abs().max() > 0


def test_hybrid_has_matched_and_unmatched_columns_and_groups_merge(pair, match):
    assert 0 < match.teacher_ids.numel() < min(len(pair[0]), len(pair[1]))
    s_groups, t_groups, _ = group_ids(*batch(pair, ANSWERS[:1])["s"]["ends"], *batch(pair, ANSWERS[:1])["t"]["ends"])
    assert max(map(s_groups.count, set(s_groups))) >= 2 and max(map(t_groups.count, set(t_groups))) >= 3


def random_logp(*shape, seed=0):
    return F.log_softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2, dim=-1)


def identity_match(vocab_size: int) -> VocabMatch:
    ids = torch.arange(vocab_size)
    empty = torch.zeros(0, dtype=torch.long)
    match = VocabMatch(ids, ids, vocab_size, vocab_size, empty, empty, empty.float(), torch.full((vocab_size,), -1))
    return cv.with_projection(match, ids, ids, torch.ones(vocab_size))


def test_uld_is_zero_for_identical_and_blind_to_column_order():
    s, t = random_logp(5, 17, seed=1), random_logp(5, 23, seed=2)
    assert cv.uld_sum(s, s.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert cv.uld_sum(s, t).item() > 0.1
    assert cv.uld_sum(s, t[:, torch.randperm(23)]).item() == pytest.approx(cv.uld_sum(s, t).item(), rel=1e-6)


def test_merge_of_single_token_groups_is_the_rows_and_unscored_rows_drop_out():
    logp, targets = random_logp(6, 9), torch.tensor([1, 2, 3, 4, 5, 6])
    assert torch.equal(merge_groups(logp, targets, torch.arange(6), 6), logp)
    groups = torch.tensor([-1, 0, 1, -1, 2, -1])
    assert torch.equal(merge_groups(logp, targets, groups, 3), logp[[1, 2, 4]])


def test_merge_is_the_chain_rule_with_trls_clamp():
    logp = random_logp(3, 7)
    merged = merge_groups(logp, torch.tensor([4, 2, 0]), torch.tensor([0, 0, 1]), 2)
    torch.testing.assert_close(merged.exp()[0], logp.exp()[0, 4] * logp.exp()[1])         # P(a) P(. | a)
    torch.testing.assert_close(merged[1], logp[2])
    tiny = logp.clone()
    tiny[0, 4] = -40.0                                                                       # p < 1e-8: clamped
    torch.testing.assert_close(merge_groups(tiny, torch.tensor([4, 2, 0]), torch.tensor([0, 0, 1]), 2)[0],
                               logp[1] + math.log(1e-8))


def test_pkl_with_identity_projection_is_forward_kl_of_normalised_rows():
    s, t = random_logp(4, 13, seed=3) - 1.7, random_logp(4, 13, seed=4) - 0.4    # merged rows: unnormalised
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="sum", log_target=True)
    assert cv.pkl_sum(s, t, identity_match(13)).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_gold_hybrid_with_every_column_matched_is_trls_jsd(beta):
    s, t = random_logp(4, 13, seed=5), random_logp(4, 13, seed=6)
    expected = GOLDTrainer.generalized_jsd_loss(s.exp(), t.exp(), beta=beta, reduction="sum", logits_are_probs=True)
    assert cv.gold_hybrid_sum(s, t, identity_match(13), beta=beta).item() == pytest.approx(expected.item(), rel=1e-5)
    if 0 < beta < 1:   # tune_kd's jsd is the same bracket divided by beta (1 - beta)
        assert cv.gold_hybrid_sum(s, t, identity_match(13), beta=beta).item() == pytest.approx(
            jsd_sum(s, t, 1.0, beta=beta).item() * beta * (1 - beta), rel=1e-5)


def test_gold_hybrid_drops_the_rank_matched_part_when_one_side_has_no_unmatched_column():
    """TRL's rule: every student column matched, two teacher columns unmatched -> the ULD part is 0
    (not the teacher's unmatched mass against zero padding), the JSD part weighted 13/15."""
    s, t = random_logp(4, 13, seed=5), random_logp(4, 15, seed=6)
    expected = GOLDTrainer.generalized_jsd_loss(s.exp(), t[:, :13].exp(), beta=0.3, reduction="sum",
                                                logits_are_probs=True)
    assert cv.gold_hybrid_sum(s, t, identity_match(13), beta=0.3).item() == pytest.approx(
        13 / 15 * expected.item(), rel=1e-5)


def test_pkl_and_hkl_follow_their_definitions_on_a_hand_built_w():
    """Vs = 4, Vt = 5. W: s0 -> t0 (exact), s1 -> t1, t2 (2:1, top t1), s2 -> t1 (two student tokens
    on one teacher column), s3 no row."""
    empty = torch.zeros(0, dtype=torch.long)
    match = VocabMatch(torch.tensor([0]), torch.tensor([0]), 4, 5, empty, empty, empty.float(), torch.full((4,), -1))
    match = cv.with_projection(match, [0, 1, 1, 2], [0, 1, 2, 1], [1.0, 1.0, 0.5, 1.0])
    assert match.top_teacher.tolist() == [0, 1, 1, -1]
    w = torch.tensor([[1, 0, 0, 0, 0], [0, 2 / 3, 1 / 3, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    torch.testing.assert_close(match.projection().to_dense(), w)
    s, t = random_logp(3, 4, seed=11) - 0.5, random_logp(3, 5, seed=12) - 0.2     # unnormalised merged rows
    q = s.exp() @ w
    # t3, t4 are reached by no student token: the 1e-8 floor bounds their terms
    expected = F.kl_div(torch.log((q / q.sum(-1, keepdim=True)).clamp_min(1e-8)), F.log_softmax(t, -1),
                        reduction="sum", log_target=True)
    assert cv.pkl_sum(s, t, match).item() == pytest.approx(expected.item(), rel=1e-5)
    q_s, p = s.exp(), t.exp()
    q_r = torch.stack([q_s[:, 0], q_s[:, 1] + q_s[:, 2]], dim=1)                          # reached: t0, t1
    kl = (p[:, :2] * (p[:, :2].log() - q_r.log())).sum()
    uld = (p[:, 2:].sort(-1, descending=True).values - F.pad(q_s[:, 3:], (0, 2))).abs().sum()
    assert cv.hkl_sum(s, t, match).item() == pytest.approx((2 / 5 * kl + 3 / 5 * uld).item(), rel=1e-5)


def test_hkl_with_only_exact_pairs_in_w_is_gold_hybrid_at_beta_zero(pair, match):
    exact = cv.with_projection(match, match.student_ids, match.teacher_ids, torch.ones(match.student_ids.numel()))
    s, t = random_logp(5, len(pair[0]), seed=7), random_logp(5, len(pair[1]), seed=8)
    assert cv.hkl_sum(s, t, exact).item() == pytest.approx(cv.gold_hybrid_sum(s, t, match, beta=0.0).item(), rel=1e-5)


def test_projection_losses_credit_a_numeral_to_its_first_digit(pair, match):
    """The student sure of "201", the teacher sure of its first piece "2": P-KL and H-KL see agreement
    (W carries "201"'s mass to "2"), GOLD's hybrid sees none ("201" sits on its rank-matched side)."""
    student, teacher = pair
    s = torch.zeros(1, len(student))
    s[0, student.convert_tokens_to_ids("201")] = 12.0
    t = torch.zeros(1, len(teacher))
    t[0, teacher.convert_tokens_to_ids("2")] = 12.0
    s, t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    exact = cv.with_projection(match, match.student_ids, match.teacher_ids, torch.ones(match.student_ids.numel()))
    assert cv.hkl_sum(s, t, match).item() < 0.02 < 0.5 < cv.hkl_sum(s, t, exact).item()
    assert cv.pkl_sum(s, t, match).item() < 0.5 * cv.pkl_sum(s, t, exact).item()
    assert cv.gold_hybrid_sum(s, t, match, beta=0.0).item() > 0.5


@pytest.mark.parametrize("name", sorted(CROSS_VOCAB_LOSSES))
def test_sums_add_over_chunks_and_gradients_stay_finite_at_zero_probability(pair, match, name):
    logits_s = torch.randn(6, len(pair[0]), generator=torch.Generator().manual_seed(9)) * 3
    logits_s[:, :40] = -math.inf                                   # tokens the student gives no mass
    logits_s.requires_grad_(True)
    logits_t = torch.randn(6, len(pair[1]), generator=torch.Generator().manual_seed(10)) * 3
    logits_t[:, 50:90] = -math.inf
    s, t = F.log_softmax(logits_s, -1), F.log_softmax(logits_t, -1)
    whole = CROSS_VOCAB_LOSSES[name](s, t, vocab=match, beta=0.5)
    halves = CROSS_VOCAB_LOSSES[name](s[:3], t[:3], vocab=match, beta=0.5) + \
        CROSS_VOCAB_LOSSES[name](s[3:], t[3:], vocab=match, beta=0.5)
    assert whole.item() == pytest.approx(halves.item(), rel=1e-5) and whole.item() > 0
    (grad,) = torch.autograd.grad(whole, logits_s)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    assert CROSS_VOCAB_TEMPERATURE_POWER[name] in (1, 2)


def test_projection_rows_sum_to_one_and_numerals_map_to_their_digits(pair, match):
    student, teacher = pair
    w = match.projection().to_dense()
    has_row = w.sum(1) > 0
    torch.testing.assert_close(w.sum(1)[has_row], torch.ones(int(has_row.sum())))
    assert has_row.float().mean() > 0.9
    numeral = student.convert_tokens_to_ids("201")
    digits = teacher.convert_tokens_to_ids(["2", "0", "1"])
    assert numeral is not None and "201" not in teacher.get_vocab()
    row = w[numeral]
    torch.testing.assert_close(row[digits], torch.tensor([4 / 7, 2 / 7, 1 / 7]))
    assert row.sum().item() == pytest.approx(1.0) and match.top_teacher[numeral].item() == digits[0]
    # a word both spell alike maps to itself with weight 1; the student's eos to the teacher's
    word = next(text for text in ("Ġthe", "Ġnumbers", "ĠSorting", "Ġand") if text in student.get_vocab())
    assert w[student.convert_tokens_to_ids(word), teacher.convert_tokens_to_ids(word)].item() == 1.0
    assert w[student.eos_token_id, teacher.eos_token_id].item() == 1.0


def test_audit_recommends_a_projection_when_numerals_do_not_match(pair, match):
    student, teacher = pair
    audit = cv.coverage_audit(student, teacher, match)
    numerals = audit["student"]["numeral"]
    assert numerals["total"] >= 5 and numerals["matched"] == 0 and numerals["projected"] == numerals["total"]
    assert audit["teacher"]["digit"]["matched"] == audit["teacher"]["digit"]["total"] == 10
    assert cv.recommended_method(audit) == "pkl"
    # the other way round (the teacher packs numerals, the student splits them) fails GOLD as well
    assert cv.recommended_method(cv.coverage_audit(teacher, student, cv.match_vocabularies(teacher, student))) == "pkl"
    # one tokenizer against itself: GOLD's partition is sound
    assert cv.recommended_method(cv.coverage_audit(student, student, cv.match_vocabularies(student, student))) == \
        "gold_hybrid"
    line = cv.describe_audit(audit)
    assert "\n" not in line and "pkl" in line and "numeral 0/" in line


def test_vocab_match_moves_whole(match):
    moved = match.to("cpu")
    assert all(getattr(moved, f.name).device.type == "cpu" for f in dataclasses.fields(moved)
               if isinstance(getattr(moved, f.name), torch.Tensor))
