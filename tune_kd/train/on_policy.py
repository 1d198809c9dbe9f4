"""On-policy distillation (GKD), sequence-level KD and the generation metrics: the models answer.

Off-policy KD (MiniMind's) trains the student on the data's replies; at inference it conditions on
its own earlier tokens, which it never trained on. For a share `train.on_policy_fraction` of the
micro-batches (drawn from (train.seed, epoch, micro-batch), so every rank and every resume agrees)
after the off-policy warm-up (the first `train.on_policy_start` share of the optimizer steps) the
loop instead:

1. cuts each conversation before its last assistant reply: the prompt is every earlier turn and
   the assistant header, exactly as the chat template rendered them at ingestion;
2. lets the student sample a reply (train.generation_temperature; at most train.max_new_tokens;
   batched, with a KV cache, in inference mode) that ends at the template's end-of-turn token, which
   is kept: prompt + reply is token for token what the template renders for that reply;
3. runs student and live teacher on prompt + reply and back-propagates the chosen divergence,
   T^k * D, on the generated positions only (no CE: a sampled token is not a label).

`train.seq_kd` (sequence-level KD): off-policy batches learn the teacher's greedy reply to each
prompt instead of the data's (alpha * CE + (1 - alpha) * KD as usual), generated once per example.

`val_gen_acc` / `val_gen_ce`: the student answers a fixed, seeded subset of the validation prompts
(eval.generation_samples) greedily; val_gen_acc is the share answered exactly as the data answers
(end-of-turn included), val_gen_ce the teacher's mean per-token CE on those replies: how plausible
the teacher finds what the student says, for data without checkable answers.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch

from tune_kd.config.errors import UserError
from tune_kd.data.tokenized import IGNORE_INDEX, VAL_SPLIT_SEED, TokenizedData

GENERATION_SUBSET_SEED = VAL_SPLIT_SEED + 2     # which validation prompts val_gen_* uses: the same every epoch and trial
ON_POLICY_STREAM = 17                           # keeps the on-policy draw apart from other (seed, epoch) streams


def end_of_turn_id(tokenizer, asked_by: str) -> int:
    """The one token the chat template puts after an assistant reply (ChatML's <|im_end|>):
    generation stops there. asked_by: the setting that needs it, for the error line."""
    from tune_kd.data.chat_template import ChatRenderer

    try:
        footer = ChatRenderer(tokenizer).reply_markers()[1]
    except Exception as exc:   # a template that refuses the probe conversation
        raise UserError(f"{asked_by}: the chat template does not render a reply as header + reply + end-of-turn "
                        f"({exc}); generation needs to know where a reply ends") from None
    ids = tokenizer.encode(footer, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"{asked_by}: the chat template ends an assistant reply with {footer!r}, {len(ids)} tokens; "
                        "generation stops on a single end-of-turn token (ChatML's <|im_end|>, Llama 3's <|eot_id|>): "
                        "use such a template, or turn the setting off")
    return ids[0]


def is_on_policy(fraction: float, seed: int, epoch: int, micro: int, warmed_up: bool = True) -> bool:
    """Whether micro-batch `micro` of `epoch` is on-policy: a pure function, alike on every rank.
    warmed_up: training is past train.on_policy_start (on_policy_started); before, every batch is
    the data's (the off-policy warm-up)."""
    if fraction <= 0.0 or not warmed_up:
        return False
    return fraction >= 1.0 or bool(np.random.default_rng([seed, epoch, micro, ON_POLICY_STREAM]).random() < fraction)


def on_policy_started(step: int, total_steps: int, start: float) -> bool:
    """Whether optimizer step `step` of `total_steps` is past the off-policy warm-up: the first
    `start` share of training (train.on_policy_start) learns from the data's replies only, as GKD
    and MiniLLM start on-policy from a student already fine-tuned on them."""
    return step >= start * total_steps


def sampling_seed(seed: int, epoch: int, micro: int, rank: int) -> int:
    """The generator seed of one on-policy micro-batch: resuming mid-epoch samples the same replies."""
    return int(np.random.default_rng([seed, epoch, micro, rank, ON_POLICY_STREAM]).integers(2**62))


def split_last_reply(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, reply): the ids before the last assistant reply (the assistant header included) and
    the reply itself with its end-of-turn token (cut short when ingestion truncated it)."""
    assistant = np.flatnonzero(mask)
    breaks = np.flatnonzero(np.diff(assistant) > 1)
    start = int(assistant[breaks[-1] + 1] if len(breaks) else assistant[0])
    return tokens[:start].astype(np.int64), tokens[start:int(assistant[-1]) + 1].astype(np.int64)


def prompts_and_replies(data: TokenizedData, indices) -> tuple[list[np.ndarray], list[np.ndarray]]:
    pairs = [split_last_reply(*data.example(int(i))) for i in indices]
    return [p for p, _ in pairs], [r for _, r in pairs]


@torch.inference_mode()
def generate(lm, prompts: list[np.ndarray], *, max_new_tokens: int, temperature: float, end_of_turn: int,
             pad_id: int, position_limit: int | None, seed: int = 0, autocast=contextlib.nullcontext) -> list[np.ndarray]:
    """One reply per prompt: sampled at `temperature` from the full distribution (0: greedy), in one
    left-padded batch with a KV cache, each cut after its first end-of-turn token (kept). At most
    max_new_tokens, fewer when the longest prompt leaves less room before position_limit."""
    longest = max(len(p) for p in prompts)
    room = max_new_tokens if position_limit is None else min(max_new_tokens, position_limit - longest)
    if room < 1:
        return [np.zeros(0, dtype=np.int64) for _ in prompts]
    device = next(lm.parameters()).device
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.from_numpy(prompt)
        attention[row, longest - len(prompt):] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}
    was_training = lm.training
    lm.eval()   # no dropout while answering
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast():
            torch.manual_seed(seed)   # a forked generator: the training stream (dropout, shuffles) is untouched
            out = lm.generate(ids.to(device), attention_mask=attention.to(device), max_new_tokens=room,
                              eos_token_id=end_of_turn, pad_token_id=pad_id, use_cache=True, **sampling)
    finally:
        lm.train(was_training)
    replies = []
    for row in out[:, longest:].cpu().numpy().astype(np.int64):
        stops = np.flatnonzero(row == end_of_turn)
        replies.append(row[:stops[0] + 1] if len(stops) else row)
    return replies


def reply_batch(prompts: list[np.ndarray], replies: list[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded training batch of prompt + reply, labelled on the reply only (as tokenized.collate
    labels assistant tokens), so scoring.scored_positions picks exactly the reply's predictions."""
    width = max(len(p) + len(r) for p, r in zip(prompts, replies))
    input_ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    labels = np.full((len(prompts), width), IGNORE_INDEX, dtype=np.int64)
    for row, (prompt, reply) in enumerate(zip(prompts, replies)):
        input_ids[row, :len(prompt)] = prompt
        input_ids[row, len(prompt):len(prompt) + len(reply)] = reply
        labels[row, len(prompt):len(prompt) + len(reply)] = reply
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "num_tokens": int(sum(len(p) + len(r) for p, r in zip(prompts, replies))), "indices": None}


def reply_targets(replies: list[np.ndarray]) -> int:
    """Scored positions of a reply_batch: every reply token (a prompt is never empty, so each has a
    position before it)."""
    return int(sum(len(r) for r in replies))


class Generation:
    """What the loop generates with: the end-of-turn token, padding, the position limit both models
    share, and seq_kd's teacher replies (greedy, so each example's is generated once)."""

    def __init__(self, cfg, tokenizer, pad_id: int, models: list, asked_by: str):
        limits = [getattr(m.config, "max_position_embeddings", None) for m in models if m is not None]
        self.position_limit = min((x for x in limits if x), default=None)
        self.end_of_turn, self.pad_id, self.train_cfg = end_of_turn_id(tokenizer, asked_by), pad_id, cfg.train
        self.teacher_replies: dict[int, np.ndarray] = {}

    def answer(self, lm, prompts, temperature: float, seed: int = 0, autocast=contextlib.nullcontext):
        return generate(lm, prompts, max_new_tokens=self.train_cfg.max_new_tokens, temperature=temperature,
                        end_of_turn=self.end_of_turn, pad_id=self.pad_id, position_limit=self.position_limit,
                        seed=seed, autocast=autocast)

    def on_policy_batch(self, student_lm, data: TokenizedData, indices, seed: int, autocast) -> tuple[dict, int]:
        """(the batch of prompts with the student's sampled replies, its scored-position count)."""
        prompts, _ = prompts_and_replies(data, indices)
        replies = self.answer(student_lm, prompts, self.train_cfg.generation_temperature, seed, autocast)
        return reply_batch(prompts, replies, self.pad_id), reply_targets(replies)

    def teacher_reply_batch(self, teacher_lm, data: TokenizedData, indices, autocast) -> tuple[dict, int]:
        """(the batch of prompts with the teacher's greedy replies, its scored-position count); the
        replies are kept per example index (a data set's worth of short replies is small)."""
        prompts, _ = prompts_and_replies(data, indices)
        missing = [k for k, i in enumerate(indices) if int(i) not in self.teacher_replies]
        if missing:
            fresh = self.answer(teacher_lm, [prompts[k] for k in missing], 0.0, autocast=autocast)
            self.teacher_replies.update({int(indices[k]): reply for k, reply in zip(missing, fresh)})
        replies = [self.teacher_replies[int(i)] for i in indices]
        return reply_batch(prompts, replies, self.pad_id), reply_targets(replies)


def generation_subset(val_data: TokenizedData, count: int) -> np.ndarray:
    """The validation examples val_gen_* answers: `count` of them, the same in every epoch and trial."""
    order = np.random.default_rng(GENERATION_SUBSET_SEED).permutation(len(val_data))
    return np.sort(order[:min(count, len(val_data))])


def generation_sums(student_lm, generation: Generation, val_data: TokenizedData, indices: np.ndarray,
                    batch_size: int, teacher_ce: Callable[[dict], float] | None, autocast, device) -> torch.Tensor:
    """[exact replies, prompts, teacher CE sum, reply tokens] over `indices` (a rank's share):
    greedy student replies against the data's, and the teacher's CE on each generated token
    (teacher_ce(batch): the CE sum over the batch's labelled tokens, evaluate.teacher_ce_of)."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for lo in range(0, len(indices), batch_size):
        prompts, references = prompts_and_replies(val_data, indices[lo:lo + batch_size])
        replies = generation.answer(student_lm, prompts, 0.0, autocast=autocast)
        sums[0] += sum(np.array_equal(r, ref) for r, ref in zip(replies, references))
        sums[1] += len(prompts)
        scored = reply_targets(replies)
        if teacher_ce is not None and scored:
            sums[2] += teacher_ce(reply_batch(prompts, replies, generation.pad_id))
            sums[3] += scored
    return sums


def generation_metrics(sums: torch.Tensor, has_teacher: bool) -> dict:
    right, rows, ce, tokens = sums.tolist()
    return {"val_gen_acc": right / rows if rows else float("nan"),
            "val_gen_ce": ce / tokens if has_teacher and tokens else float("nan")}
