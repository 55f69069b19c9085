"""Structured outputs (serve/structured.py): a JSON schema or regex constrains every sampled token.

The built-in model has random weights, so unconstrained it writes no JSON; constrained, every
output parses and matches its schema, sampled at temperature 1 over several seeds. A row without a
constraint keeps its greedy tokens next to a constrained one, and a tp=2 mesh (logits split over
the vocabulary) gives one device's constrained tokens.
"""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from serve.builtin import builtin_checkpoint
from serve.engine import Engine
from serve.sampling import SamplingParams, mask_logits
from serve.structured import StructuredOutputError, TokenMasks, token_bytes
from serve.tokenizer import Tokenizer

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                                    "maxItems": 3}},
          "required": ["name", "age", "tags"]}
KW = dict(dtype="float32", context_length=256, max_running_requests=4, chunked_prefill_size=32, progress=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return builtin_checkpoint(str(tmp_path_factory.mktemp("builtin")))


@pytest.fixture(scope="module")
def engine(ckpt):
    eng = Engine(ckpt, **KW)
    yield eng
    eng.shutdown()


def test_mask_logits_keeps_exactly_the_set_bits():
    """Words [B, W] against a numpy reference at V = 70 (a partial last word); an all-ones row is
    left untouched."""
    rng = np.random.default_rng(0)
    v = 70
    logits = rng.standard_normal((3, v)).astype(np.float32)
    allowed = rng.random((3, v)) < 0.3
    allowed[2] = True
    words = np.zeros((3, 3), np.uint32)
    for b, i in zip(*np.nonzero(allowed)):
        words[b, i // 32] |= np.uint32(1 << (i % 32))
    words[2] = 0xFFFFFFFF
    got = np.asarray(mask_logits(jnp.asarray(logits), jnp.asarray(words.view(np.int32))))
    np.testing.assert_array_equal(got, np.where(allowed, logits, -np.inf))


@pytest.mark.gpu
def test_gpu_mask_logits_at_qwen3_vocab():
    """The compiled mask at Qwen3's vocabulary (151936 columns, 4748 words) and 64 rows, some
    rows all-allowed, against numpy."""
    import jax

    rng = np.random.default_rng(1)
    b, v = 64, 151936
    logits = rng.standard_normal((b, v)).astype(np.float32)
    words = rng.integers(-2 ** 31, 2 ** 31, (b, -(-v // 32)), dtype=np.int64).astype(np.int32)
    words[::4] = -1
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :v].astype(bool)
    got = np.asarray(jax.jit(mask_logits)(jnp.asarray(logits), jnp.asarray(words)))
    np.testing.assert_array_equal(got, np.where(bits, logits, -np.inf))


def test_token_bytes_cover_every_byte_and_leave_out_special_tokens(ckpt):
    tok = Tokenizer(ckpt)
    table = token_bytes(tok)
    singles = {raw[0] for raw in table if len(raw) == 1}
    assert singles == set(range(256))   # byte-level BPE: any text can be written
    ids = {i for v in table.values() for i in v}
    assert not ids & set(tok.special_ids) and len(ids) == tok.tok.get_vocab_size() - len(tok.special_ids)
    assert table[" over".encode()] == [tok.tok.token_to_id("\u0120over")]


def test_json_schema_outputs_parse_and_match_the_schema(engine):
    seeds = range(6)
    free = engine.generate(["Name and age:"] * len(seeds),
                           [SamplingParams(max_tokens=80, temperature=1.0, seed=s) for s in seeds])
    assert not any(_parses(o.text) for o in free)   # random weights write no JSON by themselves
    outs = engine.generate(["Name and age:"] * len(seeds),
                           [SamplingParams(max_tokens=200, temperature=1.0, seed=s, json_schema=PERSON) for s in seeds])
    for o in outs:
        assert o.finish_reason == "stop", o.text
        doc = json.loads(o.text)
        assert list(doc) == ["name", "age", "tags"]   # the schema's order
        assert isinstance(doc["name"], str) and len(doc["name"]) <= 12 and isinstance(doc["age"], int)
        assert len(doc["tags"]) <= 3 and all(isinstance(t, str) and len(t) <= 6 for t in doc["tags"])
    assert len({o.text for o in outs}) > 1   # sampled, not one forced string


def test_regex_and_json_object(engine):
    pattern = r"(19|20)[0-9]{2}-[a-z]{3,5}"
    outs = engine.generate(["Date:"] * 4, [SamplingParams(max_tokens=20, temperature=1.0, seed=s, regex=pattern)
                                           for s in range(4)])
    assert all(re.fullmatch(pattern, o.text) and o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    obj = engine.generate("Any object:", SamplingParams(max_tokens=200, temperature=0,   # closes at ~150
                                                         json_schema={"type": "object"}))[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict)


def test_an_unconstrained_row_keeps_its_tokens_beside_a_constrained_one(engine):
    alone = engine.generate("The quick brown", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    both = engine.generate(["The quick brown", "Count:"],
                           [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                            SamplingParams(max_tokens=20, temperature=0, regex="[0-9]{1,4}( [0-9]{1,4}){0,3}")])
    assert both[0].token_ids == alone.token_ids
    assert re.fullmatch("[0-9]{1,4}( [0-9]{1,4}){0,3}", both[1].text)


def test_constrained_tokens_are_the_same_on_a_tp2_mesh(ckpt, engine):
    """The mask acts on logits split over the vocabulary (tp=2): greedy constrained tokens equal
    one device's."""
    params = SamplingParams(max_tokens=120, temperature=0, json_schema=PERSON)
    mesh = Engine(ckpt, mesh="tp=2", **KW)
    try:
        got = mesh.generate("Name and age:", params)[0]
    finally:
        mesh.shutdown()
    want = engine.generate("Name and age:", params)[0]
    assert got.token_ids == want.token_ids and json.loads(got.text)


def test_bad_constraints_are_refused_with_the_reason(engine):
    with pytest.raises(ValueError, match="json_schema is not valid JSON"):
        SamplingParams(json_schema="{not json").validate()
    with pytest.raises(ValueError, match="give one of them"):
        SamplingParams(json_schema={"type": "object"}, regex="a+").validate()
    with pytest.raises(StructuredOutputError, match="regex cannot be compiled"):
        engine.submit("x", SamplingParams(regex="(unclosed"))
    # the engine goes on serving
    assert engine.generate("x", SamplingParams(max_tokens=3, regex="[ab]{3}"))[0].text in {
        a + b + c for a in "ab" for b in "ab" for c in "ab"}


def test_index_is_compiled_once_per_constraint(ckpt):
    masks = TokenMasks(Tokenizer(ckpt), 600)
    first = masks.guide("regex", "[0-9]+")
    masks.guide("regex", "[0-9]+")
    assert masks._index.cache_info().hits == 1 and masks._index.cache_info().misses == 1
    row = np.zeros(masks.words, np.int32)
    masks.write(first, row)
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    assert sorted(np.flatnonzero(bits)) == sorted(first.get_tokens())


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_constraint_after_leaves_the_tokens_before_its_start_token_free(engine):
    """constraint_after = a token the free greedy reply writes at position 5 (standing in for a
    thinking model's </think>): the reply up to and including it is the free one, token for token;
    from there on it matches the regex and ends."""
    free = engine.generate("The quick brown", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    ids = free.token_ids
    p = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    pattern = "[0-9]{2,4}"
    got = engine.generate("The quick brown", SamplingParams(max_tokens=24, temperature=0, regex=pattern,
                                                            constraint_after=ids[p]))[0]
    assert got.token_ids[:p + 1] == ids[:p + 1] and got.finish_reason == "stop"
    rest = engine.tokenizer.decode(got.token_ids[p + 1:])
    assert re.fullmatch(pattern, rest), rest


def test_chat_constraint_starts_after_thinking_unless_the_prompt_closed_it():
    """The HTTP layer's rule (openai_api._after_thinking): with a reasoning parser, a constrained
    chat reply's constraint starts after </think>, unless the generation prompt already closed the
    thinking (enable_thinking false) or the vocabulary has no </think>."""
    from types import SimpleNamespace

    from serve.openai_api import _after_thinking

    def engine_with(think_end):
        return SimpleNamespace(tokenizer=SimpleNamespace(tok=SimpleNamespace(token_to_id=lambda t: think_end)))
    params = SamplingParams(regex="a+")
    opened = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    closed = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    earlier = "</think>\nold<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert _after_thinking(engine_with(151668), params, opened).constraint_after == 151668
    assert _after_thinking(engine_with(151668), params, earlier).constraint_after == 151668
    assert _after_thinking(engine_with(151668), params, closed).constraint_after is None
    assert _after_thinking(engine_with(None), params, opened).constraint_after is None
