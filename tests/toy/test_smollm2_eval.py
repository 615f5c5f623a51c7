"""The prune-and-heal measures (``opd_train.toy.smollm2_eval``) on tiny random HF Llama models: the fast paths
(output layer on the response rows only, cached teacher rows, the last position's logits in generation) give what
the plain full-logits computation gives, and the prompts reach the model exactly as the driver sends them."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from opd_train.toy import smollm2_eval as ev  # noqa: E402

VOCAB = 96


def tiny_llama(seed: int, vocab: int = VOCAB):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).float().eval()


def naive_kl(student, teacher, prompts, responses) -> float:
    total, count = 0.0, 0
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        ls = torch.log_softmax(student(input_ids=ids).logits[0, len(p) - 1:-1], -1)
        lt = torch.log_softmax(teacher(input_ids=ids).logits[0, len(p) - 1:-1, :ls.shape[-1]], -1)
        total += float((ls.exp() * (ls - lt)).sum())
        count += len(r)
    return total / count


@pytest.fixture(scope="module")
def pairs():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 7, 5, 9, 4)]
    responses = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (4, 1, 6, 2, 5)]
    return prompts, responses


def mean_kl(*args, **kwargs) -> float:
    return ev.mean_and_se(ev.response_kls(*args, **kwargs))[0]


@torch.no_grad()
def test_mean_kl_equals_full_logits_and_reads_only_the_students_columns_of_a_padded_teacher(pairs):
    prompts, responses = pairs
    student, teacher = tiny_llama(1), tiny_llama(2, vocab=VOCAB + 32)        # teacher embedding padded by 32 rows
    want = naive_kl(student, teacher, prompts, responses)
    assert want > 0.01
    assert mean_kl(student, teacher, prompts, responses, batch=2) == pytest.approx(want, rel=1e-5)
    cached = ev.response_logprobs(teacher, prompts, responses, batch=2, columns=VOCAB)
    assert mean_kl(student, None, prompts, responses, teacher_logprobs=cached, batch=2) == pytest.approx(want,
                                                                                                           rel=1e-5)
    assert mean_kl(student, student, prompts, responses) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="do not match"):          # rows over the padded vocabulary, or other batches
        mean_kl(student, None, prompts, responses, batch=2,
                   teacher_logprobs=ev.response_logprobs(teacher, prompts, responses, batch=2))


@torch.no_grad()
def test_response_kls_are_each_answers_own_kl_and_the_se_is_the_ratio_estimators(pairs):
    prompts, responses = pairs
    student, teacher = tiny_llama(1), tiny_llama(2)
    per = ev.response_kls(student, teacher, prompts + [[1, 2]], responses + [[]], batch=2)  # an empty answer: (0, 0)
    assert per[-1] == (0.0, 0)
    for (p, r), (kl, tokens) in zip(zip(prompts, responses), per):
        assert tokens == len(r)
        assert kl / tokens == pytest.approx(naive_kl(student, teacher, [p], [r]), rel=1e-5)
    mean, se = ev.mean_and_se(per[:-1])
    assert mean == pytest.approx(naive_kl(student, teacher, prompts, responses), rel=1e-5)
    kls = torch.tensor([k for k, _ in per[:-1]], dtype=torch.float64)
    lens = torch.tensor([t for _, t in per[:-1]], dtype=torch.float64)
    assert se == pytest.approx(float((kls - mean * lens).std() / lens.mean() / len(lens) ** 0.5), rel=1e-9)
    assert ev.mean_and_se([(2.0, 4), (2.0, 4)]) == (0.5, 0.0)          # identical answers: no spread
    assert ev.mean_and_se([(2.0, 4)])[1] != ev.mean_and_se([(2.0, 4)])[1]    # one answer: no SE (nan)


@torch.no_grad()
def test_sampled_kl_equals_the_teacher_forced_kl_of_its_own_answers(pairs):
    """The lockstep decode (shared prefill, KV caches, a padded teacher read over the student's columns) gives
    per answer what the teacher-forced computation gives on the answers it sampled."""
    prompts, _ = pairs
    student, teacher = tiny_llama(1), tiny_llama(2, vocab=VOCAB + 32)
    eos = {5, 7}
    answers, kls = ev.sampled_kl(student, teacher, prompts, 6, eos, pad_id=0, samples=3, seed=4, batch=2)
    assert len(answers) == len(kls) == 3 * len(prompts)
    assert all(len(a) == 6 or (a[-1] in eos and not set(a[:-1]) & eos) for a in answers)
    assert any(a[-1] in eos for a in answers) and any(len(a) == 6 for a in answers)    # both ends exercised
    assert len({tuple(a) for a in answers[:3]}) > 1                   # one prompt's samples are drawn, not copied
    repeated = [p for p in prompts for _ in range(3)]
    want = ev.response_kls(student, teacher, repeated, answers, batch=4)
    for (got, n), (kl, tokens), a in zip(kls, want, answers):
        assert n == tokens == len(a)
        assert got == pytest.approx(kl, rel=1e-4, abs=1e-6)
    again, _ = ev.sampled_kl(student, teacher, prompts, 6, eos, pad_id=0, samples=3, seed=4, batch=2)
    assert again == answers                                           # seeded


@torch.no_grad()
def test_generate_matches_step_by_step_greedy_decoding(pairs):
    prompts, _ = pairs
    model = tiny_llama(3)
    eos = {5}
    out = ev.generate(model, prompts, 6, eos, pad_id=0, greedy=True, batch=3)
    for p, got in zip(prompts, out):
        ids = list(p)
        for _ in range(6):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] in eos:
                break
        assert got == ids[len(p):]


def test_prompts_are_encoded_as_the_driver_reads_them(tmp_path):
    """The held-out prompts go through the same text as the training file (``rollout.data``), answer pre-filled."""
    import json

    from opd_train.rollout.data import load_prompts
    from opd_train.toy import smollm2_prompts as sp
    from opd_train.toy.tokenizer import build_tokenizer
    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    questions = sp.sample_prompts(4, held=True, seed=1)
    path = sp.write_prompt_file(str(tmp_path / "p.jsonl"), questions)
    loaded = load_prompts(path, tok, input_key="messages", label_key=None, apply_chat_template=True)
    assert [list(p.ids) for p in loaded] == ev.encode_prompts(tok, questions)
    for p, (question, answer_start) in zip(loaded, questions):
        assert p.text.endswith(f"<assistant>{answer_start}") and question in p.text
    with open(path) as f:
        assert json.loads(f.readline())["messages"][-1] == {"role": "assistant", "content": questions[0][1]}
