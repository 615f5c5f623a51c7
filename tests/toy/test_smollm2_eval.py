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


@torch.no_grad()
def test_mean_kl_equals_full_logits_and_reads_only_the_students_columns_of_a_padded_teacher(pairs):
    prompts, responses = pairs
    student, teacher = tiny_llama(1), tiny_llama(2, vocab=VOCAB + 32)        # teacher embedding padded by 32 rows
    want = naive_kl(student, teacher, prompts, responses)
    assert want > 0.01
    assert ev.mean_kl(student, teacher, prompts, responses, batch=2) == pytest.approx(want, rel=1e-5)
    cached = ev.response_logprobs(teacher, prompts, responses, batch=2, columns=VOCAB)
    assert ev.mean_kl(student, None, prompts, responses, teacher_logprobs=cached, batch=2) == pytest.approx(want,
                                                                                                           rel=1e-5)
    assert ev.mean_kl(student, student, prompts, responses) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="do not match"):          # rows over the padded vocabulary, or other batches
        ev.mean_kl(student, None, prompts, responses, batch=2,
                   teacher_logprobs=ev.response_logprobs(teacher, prompts, responses, batch=2))


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
