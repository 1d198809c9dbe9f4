"""Aligning one conversation's two tokenizations by UTF-8 byte offsets (cross_tokens.py's core).

Each side is the conversation rendered with its own chat template (ChatRenderer) and tokenized with
its own tokenizer, with ingest.assistant_mask's mask. Groups are runs of student tokens and teacher
tokens that spell the same bytes of an assistant reply.

Alignment rules, per assistant reply:
- The reply's text is what each template actually rendered inside the reply's span, leading and
  trailing whitespace left out (its *core*): a template that trims the reply (Mistral's and Llama
  3's `| trim`) still aligns. When the two cores differ beyond that whitespace (a template that
  rewrites the reply), the reply is not aligned: its tokens get -1 on both sides and the stats
  count it (mismatched_replies; student_rewrites / teacher_rewrites name the side that rendered
  something other than the data's reply).
- Offsets are the tokenizers' character offsets, converted to UTF-8 byte offsets relative to the
  core's start. A token belongs to the reply's text when it overlaps the core; its end is clipped
  to the core (a token running on from the reply into a plain-text end-of-turn marker is reply
  text; the end-of-turn group gets the tokens after it). Walking both sides by token end, a group closes at every byte where a token of each
  side ends: a group holds the tokens ending after the previous close, up to and including this
  one, on each side. So several tokens with the same end (byte-level BPE splitting one character
  into pieces that share its character span) always fall in the same group, a numeral one side
  keeps whole and the other splits is one group, and no group is empty on either side.
- Lead: masked tokens of the span that end at or before the core's start (Mistral's ' ' when it is
  a token of its own, a reasoning template's empty <think></think>) join the reply's first group;
  Mistral's ' ' merged into the first reply token is simply part of that token. The lead is the
  template's fixed text, which a model trained on its template predicts with certainty, so it
  barely changes the group's probability. A token that straddles the span's start (a byte-level
  token covering header + reply) is not an assistant token (ingest's mask): a group holding it is
  dropped (-1 on both sides, groups_unmasked), since every group member must be a scored token.
- End of turn: the tokens of the span that start at or after the core's end (each template's own
  end-of-turn marker, <|im_end|>, <|eot_id|>, </s>, <end_of_turn>, and any trailing whitespace a
  template kept) form one more group, the student's with the teacher's: both predict "the reply
  ends here". A side with no such token (a template without a marker) gives the reply no such group.
- A group with a token at position 0 (never predicted) or cut off by max_seq_len on either side is
  dropped: -1 on both sides (groups_cut for the cut ones). Group ids are numbered 0..G-1 per
  example in token order, shared by both sides; a token in no group is -1.

Training scores position t's logit against token t+1 where the mask is True; group ids are per
token (the token being predicted), so the consumer takes `groups[1:][mask[1:]]` in target order.
Every grouped token is masked, and (but for dropped groups) every masked token is grouped.

"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from tune_kd.data import chat_template, ingest
from tune_kd.data.chat_template import ChatRenderer

SIDES = ("student", "teacher")


def reply_markers(renderer: ChatRenderer) -> tuple[str, str] | None:
    """(lead, end-of-turn): what the template writes inside a reply's span before and after the
    reply, from a probe conversation; None when the probe's reply is not rendered as given."""
    probe = [{"role": role, "content": content} for role, content in chat_template.PROBES[0]]
    text, spans = renderer.rendered(probe, "the probe conversation")
    span, reply = text[spans[0][0]:spans[0][1]], probe[1]["content"]
    at = span.find(reply)
    return (span[:at], span[at + len(reply):]) if at >= 0 else None


def _core(span: str, reply: str, markers: tuple[str, str] | None) -> tuple[int, int] | None:
    """(start, end) within `span` of the reply as the template rendered it, whitespace at either end
    left out: between the template's lead and end-of-turn where they frame it, else where the data's
    reply (stripped) is found; None when neither places it (the template rewrote the reply)."""
    if markers is not None:
        lead, footer = markers
        lo, hi = len(lead), len(span) - len(footer)
        if lo < hi and span.startswith(lead) and span.endswith(footer):
            inner = span[lo:hi]
            lo, hi = lo + len(inner) - len(inner.lstrip()), hi - (len(inner) - len(inner.rstrip()))
            if lo < hi:
                return lo, hi
    core = reply.strip()
    at = span.find(core)
    return (at, at + len(core)) if at >= 0 else None


@dataclass
class Side:
    """One conversation on one side, untruncated."""

    text: str
    spans: list[tuple[int, int]]
    ids: np.ndarray              # (T,) token dtype
    mask: np.ndarray             # (T,) bool: ingest.assistant_mask
    starts: np.ndarray           # (T,) int64 character offsets
    ends: np.ndarray             # (T,) int64
    byte_at: np.ndarray          # (len(text) + 1,) int64: UTF-8 byte offset of each character index


def encode_side(renderer: ChatRenderer, conversations: list[list[dict]], token_dtype, where: list[str]) -> list[Side]:
    """Each conversation rendered with this side's template and tokenized (one batch), untruncated:
    ids, ingest's assistant mask, character offsets; a DataError at where[i] as ChatRenderer.rendered says."""
    rendered = [renderer.rendered(turns, where[i]) for i, turns in enumerate(conversations)]
    encodings = renderer.backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    out = []
    for (text, spans), encoding in zip(rendered, encodings):
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        widths = 1 + (codes >= 0x80) + (codes >= 0x800) + (codes >= 0x10000)
        out.append(Side(text, spans, np.asarray(encoding.ids, dtype=token_dtype),
                        ingest.assistant_mask(encoding, spans), offsets[:, 0], offsets[:, 1],
                        np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])))
    return out


def _reply_members(side: Side, span: tuple[int, int], core: tuple[int, int]):
    """(content token indices, their byte ends relative to the core's start, clipped to the core;
    end-of-turn token indices) of one reply on one side. Lead tokens (masked, ending at or before
    the core) are content tokens ending at byte 0."""
    cs, ce = core
    lead = side.mask & (side.starts >= span[0]) & (side.ends <= cs)
    content = np.flatnonzero(((side.starts < ce) & (side.ends > cs)) | lead)
    # ends never go back (several byte-level pieces of one character share its span)
    rel = np.maximum.accumulate(side.byte_at[np.clip(side.ends[content], cs, ce)] - side.byte_at[cs])
    footer = np.flatnonzero((side.starts >= ce) & (side.starts < span[1]))
    return content, rel, footer


def align_conversation(student: Side, teacher: Side, replies: list[str], markers, max_seq_len: int,
                       stats: collections.Counter) -> tuple[np.ndarray, np.ndarray]:
    """(student group ids, teacher group ids), int32 over each side's untruncated tokens, -1 off group."""
    sides = (student, teacher)
    groups = [np.full(len(s.ids), -1, dtype=np.int32) for s in sides]
    next_id = 0
    for r, reply in enumerate(replies):
        stats["replies"] += 1
        spans = [s.spans[r] for s in sides]
        cores = [_core(s.text[lo:hi], reply, m) for s, (lo, hi), m in zip(sides, spans, markers)]
        texts = [None if c is None else s.text[lo + c[0]:lo + c[1]] for s, (lo, _), c in zip(sides, spans, cores)]
        for role, text in zip(SIDES, texts):
            stats[f"{role}_rewrites"] += text != reply.strip()
        if texts[0] is None or texts[0] != texts[1]:
            stats["mismatched_replies"] += 1
            stats["replies_unaligned"] += 1
            continue
        members = [_reply_members(s, span, (span[0] + c[0], span[0] + c[1]))
                   for s, span, c in zip(sides, spans, cores)]
        # a group closes at every byte where a token of each side ends (byte 0: the lead, no group)
        closes = np.intersect1d(members[0][1], members[1][1])
        closes = closes[closes > 0]
        local = []   # per side: (token indices, local group of each)
        for content, rel, footer in members:
            k = np.searchsorted(closes, rel, side="left")
            inside = k < len(closes)
            local.append((np.concatenate([content[inside], footer]),
                          np.concatenate([k[inside], np.full(len(footer), len(closes))])))
        count = len(closes) + (len(members[0][2]) > 0 and len(members[1][2]) > 0)
        valid, cut = np.ones(count, dtype=bool), np.zeros(count, dtype=bool)
        for side, (tokens, k) in zip(sides, local):
            keep = k < count   # end-of-turn tokens of a side whose counterpart has none
            tokens, k = tokens[keep], k[keep]
            valid[k[~side.mask[tokens] | (tokens == 0)]] = False
            cut[k[tokens >= max_seq_len]] = True
        stats["groups_unmasked"] += int((~valid).sum())
        stats["groups_cut"] += int((valid & cut).sum())
        stats["replies_unaligned"] += not valid.any()
        number = np.where(valid & ~cut, next_id + np.cumsum(valid & ~cut) - 1, -1).astype(np.int32)
        for g, (tokens, k) in zip(groups, local):
            keep = k < count
            g[tokens[keep]] = number[k[keep]]
        next_id += int((valid & ~cut).sum())
    return groups[0], groups[1]
