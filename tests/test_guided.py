"""Structured output in the torch runtime: guides, the vocabulary xgrammar reads, the token mask, the engine.

A random-weight Llama with Mistral's real SentencePiece tokenizer answers guided requests; every answer is
checked with a parser of its own (``jsonschema``, ``re``, ``lark``), and unguided requests that share the
batch still give transformers' greedy tokens.
"""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch
from transformers import LlamaForCausalLM

from tests.fixtures.guides import EBNF, LARK, REGEX, SCHEMAS
from tritonize.export.demo_model import write_demo_checkpoint
from tritonize.runtime.engine import Engine
from tritonize.runtime.grammar import (
    GrammarCompiler,
    Guide,
    GuideError,
    GuideState,
    clear_bit,
    make_guide,
    tokenizer_vocabulary,
)
from tritonize.runtime.request import GenerationRequest, StepOutput, submit_and_wait
from tritonize.runtime.sampling import Sampler, SamplingParams, SamplingRow, TokenMask, apply_token_mask
from tritonize.runtime.tokenizer import Tokenizer

xgrammar = pytest.importorskip("xgrammar")

TIMEOUT = 120
END = 2
PROMPTS = ["Give me a record:", "Once upon a time", "What is the color of a banana?", "1, 2, 3,", "Data:"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_demo_checkpoint(tmp_path_factory.mktemp("guided") / "ckpt", hidden=64, layers=2, seed=3)
    return path, LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), Tokenizer(path)


@pytest.fixture(scope="module")
def engine(tiny):
    eng = Engine(tiny[0], device="cpu", max_batch_size=8, max_seq_len=256, max_num_tokens=64).start()
    yield eng
    eng.shutdown()


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    return out[0, len(prompt):].tolist()


def ask(eng, tok, items, max_new=120, **kw):
    """items: (prompt, guide or None); returns each final StepOutput with its text."""
    requests = [GenerationRequest(request_id=f"g{i}-{threading.get_ident()}-{id(items)}", prompt_ids=tok.encode(p),
                                  max_new_tokens=max_new, end_ids=[END], guide=g, **kw)
                for i, (p, g) in enumerate(items)]
    outs = submit_and_wait(eng, requests, TIMEOUT)
    return [(out, tok.decode(out.token_ids)) for out in outs]


def check(guide: Guide, text: str) -> None:
    if guide.type == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(guide.text))
    elif guide.type == "json":
        assert isinstance(json.loads(text), dict), text
    elif guide.type == "regex":
        assert re.fullmatch(guide.text, text), text
    else:
        LARK.parse(text)


# --- guides ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, text, message", [
    ("", "{}", "guided_decoding_guide was sent without guided_decoding_guide_type"),
    ("yaml", "a: 1", "guided_decoding_guide_type 'yaml' is not one of json, json_schema, regex"),
    ("json_schema", "", "json_schema needs guided_decoding_guide: send the JSON schema"),
    ("json_schema", "{type: object}", "the json_schema guide is not JSON"),
    ("json_schema", "[1, 2]", "the json_schema guide must be a JSON object, not list"),
    ("regex", "  ", "regex needs guided_decoding_guide"),
    ("structural_tag", "tag", "the structural_tag guide is not JSON"),
])
def test_malformed_guides_are_one_line_errors(kind, text, message):
    with pytest.raises(GuideError, match=re.escape(message)) as err:
        make_guide(kind.encode(), text.encode())
    assert "\n" not in str(err.value)


def test_guides_from_the_wire():
    assert make_guide(None, None) is None and make_guide(b"", b"") is None
    assert make_guide(b"json", b"ignored") == Guide("json")
    assert make_guide("regex", "[a-z]+") == Guide("regex", "[a-z]+")
    assert make_guide(b" json_schema ", b'{"type": "integer"}') == Guide("json_schema", '{"type": "integer"}')


# --- the vocabulary as the grammar reads it ----------------------------------------------------------------
def _added_text(tok: Tokenizer, before: list[int], token: int) -> str:
    return tok.decode(before + [token])[len(tok.decode(before)):]


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json", "gpt2"])
def test_each_token_means_to_the_grammar_what_the_tokenizer_decodes(kind, sp_dir, bpe_dir, tmp_path):
    """xgrammar's reading of each token (decoded_vocab) is the text our detokenizer gives it in a stream."""
    import shutil

    from fixtures.models import REAL_NEMO2

    if kind == "tokenizer.json":
        directory = tmp_path / "hf"
        directory.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(REAL_NEMO2 / "hf" / name, directory / name)
    else:
        directory = sp_dir if kind == "sentencepiece" else bpe_dir
    tok = Tokenizer(directory)
    vocab = tok.vocab_size + 7  # a padded embedding: the ids past the tokenizer are never allowed
    pieces, vocab_type, prefix = tokenizer_vocabulary(directory, vocab, [END])
    assert vocab_type == {"sentencepiece": "BYTE_FALLBACK", "tokenizer.json": "BYTE_FALLBACK", "gpt2": "BYTE_LEVEL"}[kind]
    info = xgrammar.TokenizerInfo(pieces, getattr(xgrammar.VocabType, vocab_type), vocab_size=vocab,
                                  add_prefix_space=prefix)
    decoded = info.decoded_vocab
    context = tok.encode("Hello", add_special_tokens=False)
    checked = 0
    for token in range(0, tok.vocab_size, max(1, tok.vocab_size // 400)):
        text = _added_text(tok, context, token)
        if not pieces[token] or "\ufffd" in text:
            continue  # special tokens, and bytes that are part of a character
        assert decoded[token].decode("utf-8") == text, (token, pieces[token])
        checked += 1
    assert checked > 100
    assert all(p == "" for p in pieces[tok.vocab_size:]) and pieces[END] == ""


# --- the mask in the sampler -------------------------------------------------------------------------------
def test_the_mask_touches_guided_rows_only():
    torch.manual_seed(0)
    logits = torch.randn(3, 70)
    bitmask = torch.zeros(1, 3, dtype=torch.int32)
    for token in (5, 33, 64):
        bitmask[0, token // 32] |= 1 << (token % 32)
    clear_bit(bitmask, 0, 33)
    rows = [SamplingRow(params=SamplingParams(), seed=0, slot=i, step=0, history=()) for i in range(3)]
    sampler = Sampler(70, 3, "cpu")
    x = sampler.process(logits.clone(), rows, TokenMask([1], bitmask))
    assert torch.equal(x[0], logits[0]) and torch.equal(x[2], logits[2])
    assert torch.isfinite(x[1]).nonzero().flatten().tolist() == [5, 64]
    assert torch.equal(x[1, [5, 64]], logits[1, [5, 64]])
    chosen = sampler.sample(logits.clone(), rows, TokenMask([1], bitmask)).tokens.tolist()
    assert chosen == [int(logits[0].argmax()), max((5, 64), key=lambda t: logits[1, t]), int(logits[2].argmax())]
    bitmask[0, 0] = -1  # bit 31 of an int32 word too
    x = sampler.process(logits.clone(), rows, TokenMask([1], bitmask))
    assert torch.isfinite(x[1]).nonzero().flatten().tolist() == list(range(32)) + [64]


def test_the_device_mask_and_the_libraries_cpu_kernel_agree():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 1000, generator=g)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 32), dtype=torch.int32, generator=g)
    mask = TokenMask([4, 0, 2], bitmask)
    kernel = TokenMask([4, 0, 2], bitmask, lambda x, b: xgrammar.apply_token_bitmask_inplace(x, b, backend="cpu"))
    torch_path, library = apply_token_mask(logits.clone(), mask), apply_token_mask(logits.clone(), kernel)
    assert torch.equal(torch_path, library)
    assert torch.equal(torch_path[[1, 3, 5]], logits[[1, 3, 5]]) and torch.isinf(torch_path[4]).sum() > 100


# --- the engine --------------------------------------------------------------------------------------------
def test_guided_answers_parse_and_unguided_neighbours_stay_greedy(tiny, engine):
    path, model, tok = tiny
    guides = [Guide("json_schema", json.dumps(s)) for s in SCHEMAS.values()]
    guides += [Guide("regex", REGEX), Guide("ebnf_grammar", EBNF)]
    plain = ["Hello world", "The capital of France is"]
    items = [(p, g) for p in PROMPTS[:2] for g in guides] + [(p, None) for p in plain]
    answers = ask(engine, tok, items)
    for (prompt, guide), (out, text) in zip(items, answers):
        if guide is None:
            assert out.token_ids == hf_greedy(model, tok.encode(prompt), 120), prompt
            continue
        assert out.finish_reason in ("stop", "end"), (guide, text)
        check(guide, text)
    assert engine.stats["time_s"]["guide"] > 0


# Prompts on which this random model closes its object within the budget: any string it opens runs on until
# it happens to pick a closing quote, one of a few dozen tokens among the 32000 allowed inside a string.
JSON_PROMPTS = ["config", "Hello", "JSON please", "key value"]


def test_json_objects(tiny, engine):
    """``json``: any JSON object, compact (no whitespace outside strings)."""
    _, _, tok = tiny
    answers = ask(engine, tok, [(p, Guide("json")) for p in JSON_PROMPTS], max_new=200)
    for out, text in answers:
        assert out.finish_reason == "stop", text
        check(Guide("json"), text)
    assert any(json.loads(text) for _, text in answers)  # not only {}


def test_a_structural_tag_guide(tiny, engine):
    """xgrammar's structural tag: a tagged section whose content follows a regex."""
    _, _, tok = tiny
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<answer>",
                                                "content": {"type": "regex", "pattern": "[0-9]{2,4}"}, "end": "</answer>"}}
    for out, text in ask(engine, tok, [(p, Guide("structural_tag", json.dumps(tag))) for p in PROMPTS[:3]]):
        assert re.fullmatch(r"<answer>[0-9]{2,4}</answer>", text) and out.finish_reason == "stop", text


def test_sampled_guided_answers_parse_and_seeds_reproduce(tiny, engine):
    _, _, tok = tiny
    guide = Guide("json_schema", json.dumps(SCHEMAS["orders"]))
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
    first = ask(engine, tok, [(p, guide) for p in PROMPTS], sampling=seeded)
    again = ask(engine, tok, [(PROMPTS[3], guide)], sampling=seeded)
    for _out, text in first:
        check(guide, text)
    assert again[0][1] == first[3][1]


def test_streamed_guided_tokens_concatenate_to_a_valid_answer(tiny, engine):
    _, _, tok = tiny
    outs: list[StepOutput] = []
    done = threading.Event()

    def collect(out: StepOutput) -> None:
        outs.append(out)
        if out.finished:
            done.set()

    guide = Guide("regex", REGEX)
    engine.submit(GenerationRequest(request_id="stream-guided", prompt_ids=tok.encode("Name:"), max_new_tokens=40,
                                    end_ids=[END], guide=guide, stream=True, on_output=collect))
    assert done.wait(TIMEOUT)
    assert len(outs) > 2 and outs[-1].finish_reason in ("stop", "end")
    check(guide, tok.decode([t for o in outs for t in o.token_ids]))


def test_preempted_guided_requests_resume_their_grammar(tiny):
    """A pool of room for two of four requests: guided ones are preempted, recomputed, and answer exactly
    what they answer alone."""
    path, _, tok = tiny
    guides = [Guide("json_schema", json.dumps(SCHEMAS["ranges"])), Guide("regex", REGEX),
              Guide("json_schema", json.dumps(SCHEMAS["nested"])), Guide("ebnf_grammar", EBNF)]
    prompts = [" ".join(["word"] * 16) + f" {i}" for i in range(4)]
    with Engine(path, device="cpu", max_batch_size=4, max_seq_len=96, max_num_tokens=96, block_size=4,
                kv_cache_tokens=96) as eng:
        for guide in guides:  # compiled beforehand, so that the four are admitted together
            eng._grammar_compiler().compile(guide).result(TIMEOUT)
        crowded = ask(eng, tok, list(zip(prompts, guides)), max_new=60)
        assert eng.pool.stats.preemptions > 0
        alone = [ask(eng, tok, [(p, g)], max_new=60)[0] for p, g in zip(prompts, guides)]
    for guide, (_out, text), (_, text_alone) in zip(guides, crowded, alone):
        check(guide, text)
        assert text == text_alone


def test_bad_guides_are_refused_and_the_others_served(tiny, engine):
    _, _, tok = tiny
    items = [("a", Guide("regex", "a(b")), ("b", Guide("ebnf_grammar", "root ::= undefined_rule")),
             ("c", Guide("json_schema", '{"type": "objekt"}')), ("d", Guide("regex", REGEX)), ("e", None)]
    answers = ask(engine, tok, items, max_new=30)
    messages = [out.error for out, _ in answers[:3]]
    assert [out.finish_reason for out, _ in answers[:3]] == ["error"] * 3
    assert messages[0] == "the regex guide does not compile: Regex parsing error at position 4: The parenthesis is not closed"
    assert 'Rule "undefined_rule" is not defined' in messages[1] and 'Unsupported type "objekt"' in messages[2]
    assert all("\n" not in m and "/project/" not in m for m in messages)
    check(Guide("regex", REGEX), answers[3][1])
    assert answers[4][0].finish_reason == "length"


def test_grammars_compile_once_and_off_the_engine_thread(tiny):
    """While a guide compiles, unguided requests keep decoding; the same guide compiles once."""
    path, _, tok = tiny
    gate = threading.Event()
    with Engine(path, device="cpu", max_batch_size=4, max_seq_len=128) as eng:
        compiler = eng._grammar_compiler()
        real = compiler._compile

        def held(guide):
            assert threading.current_thread().name.startswith("tritonize-grammar")
            gate.wait(TIMEOUT)
            return real(guide)

        compiler._compile = held
        guided = threading.Event()
        engine_guide = Guide("regex", REGEX)
        eng.submit(GenerationRequest(request_id="held", prompt_ids=tok.encode("x"), max_new_tokens=20, end_ids=[END],
                                     guide=engine_guide, on_output=lambda o: o.finished and guided.set()))
        [plain] = eng.generate([tok.encode("Hello")], 12, timeout=TIMEOUT)
        assert len(plain) == 12 and not guided.is_set() and eng.num_waiting == 1
        gate.set()
        assert guided.wait(TIMEOUT)
        ask(eng, tok, [("y", engine_guide), ("z", engine_guide)], max_new=20)
        assert compiler.compiled == 1


def test_end_ids_are_allowed_exactly_where_the_grammar_may_end(tiny):
    """An integer may end after any digit: there the end id competes with more digits; a closed object
    allows nothing more and the request ends without sampling an end id. Without end ids the request
    ends once the grammar allows nothing more."""
    path, _, tok = tiny
    with Engine(path, device="cpu", max_batch_size=4, max_seq_len=128) as eng:
        compiler = eng._grammar_compiler()
        compiled = compiler.compile(Guide("json_schema", '{"type": "integer"}')).result(TIMEOUT)
        state = GuideState(compiler.xgrammar, compiled, [END], eng.vocab_size)
        bitmask = torch.zeros(1, -(-eng.vocab_size // 32), dtype=torch.int32)
        state.fill(bitmask, 0)
        assert not (bitmask[0, END // 32] >> (END % 32)) & 1  # nothing yet: no end
        assert state.advance(tok.encode("7", add_special_tokens=False)[-1:])
        state.fill(bitmask, 0)
        assert (bitmask[0, END // 32] >> (END % 32)) & 1 and not state.finished(bitmask.clone())
        obj = compiler.compile(Guide("json_schema", json.dumps(SCHEMAS["nested"]))).result(TIMEOUT)
        [(out, text)] = ask(eng, tok, [("Go", Guide("json_schema", json.dumps(SCHEMAS["nested"])))], max_new=100)
        assert out.finish_reason == "stop" and text.endswith("}")
        no_end = GuideState(compiler.xgrammar, obj, [], eng.vocab_size, compiler.stop_ids)
        assert no_end.advance(out.token_ids) and no_end.finished(bitmask)
        requests = [GenerationRequest(request_id="no-end", prompt_ids=tok.encode("Go"), max_new_tokens=100,
                                      end_ids=[], guide=Guide("json_schema", json.dumps(SCHEMAS["nested"])))]
        [out] = submit_and_wait(eng, requests, TIMEOUT)
        assert out.finish_reason == "stop"
        check(Guide("json_schema", json.dumps(SCHEMAS["nested"])), tok.decode(out.token_ids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_guided_steps_on_cuda_graphs_match_the_cpu(tiny):
    """On a GPU (CUDA graphs, Triton kernels, masks copied to the device): guided answers parse and are the
    CPU engine's, unguided neighbours too (float32 both)."""
    path, _, tok = tiny
    guides = [Guide("json_schema", json.dumps(s)) for s in SCHEMAS.values()] + [Guide("regex", REGEX)]
    items = [(p, g) for p in PROMPTS[:2] for g in guides] + [("Hello world", None), ("1, 2, 3,", None)]
    answers = {}
    for device in ("cpu", "cuda"):
        with Engine(path, device=device, dtype="float32", max_batch_size=16, max_seq_len=256) as eng:
            answers[device] = [text for _, text in ask(eng, tok, items)]
            if device == "cuda":
                assert eng.runner.graphs and eng.stats["time_s"]["guide"] > 0
    for (_, guide), text in zip(items, answers["cuda"]):
        if guide is not None:
            check(guide, text)
    assert answers["cuda"] == answers["cpu"]


def test_without_the_grammar_library_a_guided_request_is_one_line_naming_it(tiny, monkeypatch):
    import sys

    path, _, tok = tiny
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    with Engine(path, device="cpu", max_batch_size=2, max_seq_len=64) as eng:
        requests = [GenerationRequest(request_id="nolib", prompt_ids=tok.encode("x"), max_new_tokens=4,
                                      end_ids=[END], guide=Guide("json"))]
        [out] = submit_and_wait(eng, requests, TIMEOUT)
        assert out.finish_reason == "error" and "xgrammar" in out.error and "pip install xgrammar" in out.error
        assert len(eng.generate([tok.encode("x")], 3, timeout=TIMEOUT)[0]) == 3


def test_grammar_compiler_caches_by_guide(tiny):
    path, _, _ = tiny
    compiler = GrammarCompiler(path, 32000, [END])
    try:
        a = compiler.compile(Guide("regex", "[a-z]+"))
        assert compiler.compile(Guide("regex", "[a-z]+")) is a
        assert compiler.compile(Guide("regex", "[a-z]*")) is not a
        a.result(TIMEOUT)
    finally:
        compiler.shutdown()
