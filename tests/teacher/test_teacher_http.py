"""HttpTeacher against a stand-in vLLM server (tests/standin_vllm.py) on 127.0.0.1: the protocol's
mapping to the cache's rows, the uniform tail, check()'s one-line refusals, and retries."""

import socket

import numpy as np
import pytest
import torch

from tune_kd.config.errors import UserError
from tune_kd.teacher.http import HttpTeacher
from tune_kd.kd.teacher_rows import TAIL_TEMPERATURES, TeacherRows

from standin_vllm import StandinVLLM

K = 8

# three conversations of different lengths, scored at non-contiguous positions; each is cut after
# its last scored position + 1 (lengths 12, 5, 20 are sent)
LENGTHS = (15, 6, 24)
SCORED = [np.array([0, 3, 4, 10]), np.array([1, 3]), np.array([2, 7, 8, 9, 18])]


@pytest.fixture(scope="module")
def server():
    with StandinVLLM() as standin:
        yield standin


@pytest.fixture(scope="module")
def sequences(server):
    rng = np.random.default_rng(0)
    return [rng.integers(0, server.vocab, size=n).astype(np.int64) for n in LENGTHS]


def teacher(server, **kwargs) -> HttpTeacher:
    client = HttpTeacher(kwargs.pop("url", server.url), top_k=K, columns=server.vocab, **kwargs)
    client.backoff_s = 0.01
    return client


def local_rows(server, sequences):
    """What the rows must be: (top-k ids, top-k log-probs, next-token log-probs) from the model itself."""
    ids, values, targets = [], [], []
    for seq, positions in zip(sequences, SCORED):
        logp = server.log_probs(seq.tolist())                           # (L, V)
        for p in positions:
            top = logp[p].topk(K)
            ids.append(top.indices)
            values.append(top.values)
            targets.append(logp[p, seq[p + 1]])
    return torch.stack(ids), torch.stack(values), torch.stack(targets)


def test_rows_match_the_models_own_log_softmax(server, sequences):
    client = teacher(server)
    client.check()
    posts = len(server.posts)
    rows, targets = client.score(sequences, SCORED)
    assert len(server.posts) == posts + 1                               # one request for the whole list
    sent = server.posts[-1]["prompt"]
    assert sent == [seq[:p[-1] + 2].tolist() for seq, p in zip(sequences, SCORED)]
    assert [len(prompt) for prompt in sent] == [12, 5, 20]

    ids, logprobs, target = local_rows(server, sequences)
    n = sum(map(len, SCORED))
    assert rows.values.shape == rows.ids.shape == (n, K) and rows.tail.shape == (n, len(TAIL_TEMPERATURES))
    assert rows.values.dtype == rows.tail.dtype == torch.float32 and rows.ids.dtype == torch.int32
    assert torch.equal(rows.ids.long(), ids)
    torch.testing.assert_close(rows.values, logprobs - logprobs[:, :1], atol=1e-5, rtol=0)
    assert (rows.values[:, 0] == 0).all()
    assert targets.dtype == np.float32 and targets.shape == (n,)
    np.testing.assert_allclose(targets, target.numpy(), atol=1e-5)
    # most targets lie outside the top k here: their log-probs are exact all the same (checked above)
    next_tokens = torch.tensor([int(seq[p + 1]) for seq, ps in zip(sequences, SCORED) for p in ps])
    assert not (ids == next_tokens[:, None]).any(1).all()


def test_the_tail_carries_the_rest_of_the_mass_evenly(server, sequences):
    rows, _ = teacher(server).score(sequences, SCORED)
    _, logprobs, _ = local_rows(server, sequences)
    n, vocab = rows.values.shape[0], server.vocab
    cached = TeacherRows.from_stored(rows)
    student = torch.randn(n, vocab)

    logp = cached.log_probs(student, 1.0)[1]                            # (N, V)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(n))
    torch.testing.assert_close(logp.gather(1, rows.ids.long()), logprobs, atol=1e-5, rtol=0)
    off_top = torch.ones(n, vocab, dtype=torch.bool).scatter_(1, rows.ids.long(), False)
    tail = logp[off_top].view(n, vocab - K)
    expected = torch.log((1 - logprobs.exp().sum(1, keepdim=True)) / (vocab - K))
    torch.testing.assert_close(tail, expected.expand(-1, vocab - K), atol=1e-5, rtol=0)

    # at T = 2 (a grid temperature): a distribution, the top k at (l_i - l_j) / T of each other, and
    # each tail token at (z_t - m) / T below the top one
    logp2 = cached.log_probs(student, 2.0)[1]
    torch.testing.assert_close(logp2.exp().sum(1), torch.ones(n))
    top2 = logp2.gather(1, rows.ids.long())
    torch.testing.assert_close(top2 - top2[:, :1], (logprobs - logprobs[:, :1]) / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(logp2[off_top].view(n, vocab - K) - top2[:, :1],
                               ((expected - logprobs[:, :1]) / 2).expand(-1, vocab - K), atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.log_probs(student, 3.3)[1].exp().sum(1), torch.ones(n))


def test_check_takes_the_first_served_model(server):
    client = teacher(server)
    assert client.model is None
    client.check()
    assert client.model == server.name


def test_check_lists_the_served_models_when_the_name_is_wrong(server):
    with pytest.raises(UserError, match="teacher_server.model 'other/model'") as caught:
        teacher(server, model="other/model").check()
    assert repr(server.name) in str(caught.value) and "\n" not in str(caught.value)


def test_check_names_the_server_limit_when_top_k_exceeds_max_logprobs(server):
    client = HttpTeacher(server.url, top_k=64, columns=server.vocab)
    with pytest.raises(UserError) as caught:
        client.check()
    message = str(caught.value)
    assert "at most 20 prompt log-probs" in message and "teacher_server.top_k is 64" in message
    assert "--max-logprobs 64" in message and "teacher_server.top_k: 20" in message and "\n" not in message


def test_check_refuses_an_unreachable_url_in_one_line():
    with socket.socket() as probe:                      # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(UserError) as caught:
        HttpTeacher(url, top_k=K, columns=300, timeout_s=5).check()
    message = str(caught.value)
    assert message.startswith(f"teacher_server.url {url}: no server answers (connection refused)")
    assert "vllm serve" in message and "\n" not in message


def test_check_refuses_a_server_without_prompt_logprobs():
    with StandinVLLM(prompt_logprobs=False) as plain:
        with pytest.raises(UserError, match="not a vLLM-compatible server: its completions carry no prompt_logprobs"):
            HttpTeacher(plain.url, top_k=K, columns=plain.vocab).check()


def test_transient_failures_are_retried(server, sequences):
    expected, expected_targets = teacher(server).score(sequences, SCORED)
    server.fail_next(2)
    requests = server.requests
    rows, targets = teacher(server, model=server.name, retries=3).score(sequences, SCORED)
    assert server.requests == requests + 3                              # two 500s, then the answer
    assert torch.equal(rows.ids, expected.ids) and torch.equal(rows.values, expected.values)
    assert torch.equal(rows.tail, expected.tail) and np.array_equal(targets, expected_targets)


def test_failures_beyond_the_retries_raise_naming_the_url(server, sequences):
    server.fail_next(5)
    requests = server.requests
    try:
        with pytest.raises(RuntimeError, match=f"{server.url}/v1/completions: HTTP 500"):
            teacher(server, model=server.name, retries=2).score(sequences, SCORED)
    finally:
        server.fail_next(0)
    assert server.requests == requests + 3                              # the first try and 2 retries


def test_a_model_unnamed_in_a_trial_is_looked_up_with_retries(server, sequences):
    server.fail_next(1)                                                 # GET /v1/models meets a 500 first
    client = teacher(server, retries=1)
    rows, _ = client.score(sequences[:1], SCORED[:1])
    assert client.model == server.name and rows.values.shape == (len(SCORED[0]), K)


def test_a_4xx_in_score_is_a_user_error_at_once(server, sequences):
    posts = len(server.posts)
    with pytest.raises(UserError, match="HTTP 404: The model `gone` does not exist"):
        teacher(server, model="gone").score(sequences, SCORED)
    assert len(server.posts) == posts + 1                               # not retried


def test_a_url_with_v1_works_the_same(server, sequences):
    expected, _ = teacher(server).score(sequences, SCORED)
    client = teacher(server, url=server.url + "/v1/")
    client.check()
    rows, _ = client.score(sequences, SCORED)
    assert client.model == server.name and torch.equal(rows.ids, expected.ids)
    assert torch.equal(rows.values, expected.values)


def test_nothing_scored_sends_nothing(server, sequences):
    posts = len(server.posts)
    rows, targets = teacher(server, model=server.name).score(sequences[:2], [np.array([], dtype=np.int64)] * 2)
    assert len(server.posts) == posts and rows.values.shape == (0, K) and rows.tail.shape[0] == targets.size == 0


def test_a_url_teacher_gets_no_cache_from_the_search_and_the_plan_says_why(tiny_config):
    """The search's driver builds no teacher cache for a teacher served at a url (its weights are not
    here) and says so in the teacher cache's words; nothing is loaded to decide it."""
    from tune_kd.search.prepare import prepare_teacher_rows

    cfg = tiny_config(teacher_server={"url": "http://127.0.0.1:9", "top_k": 8})
    assert prepare_teacher_rows(cfg, serve=False) == (
        None, "not used: teacher_server.url serves the teacher (its weights are not here to build a cache from)", None,
        None)
    assert prepare_teacher_rows(cfg, serve=True)[1].startswith("not used: teacher_server.url serves the teacher")
