"""The wire interface of a generated repository, defined once.

The ensemble declares every input and output of NVIDIA's tensorrtllm_backend ensemble (names, types,
dims), so existing clients, genai-perf's ``tensorrtllm`` converter and Triton's OpenAI frontend work
unchanged; what a repository cannot honour is refused by name when a request asks for it. Two
differences, both deliberate: ``text_input`` and ``max_tokens`` are declared optional (Triton 2.51 lets
a request that lacks a required input through its count check and then answers it with an empty final
response; optional, the request reaches the preprocessing model, which names what is missing), and
``num_input_tokens`` / ``num_output_tokens`` are outputs of tritonize's own (Triton's OpenAI frontend
reads them). The inner tensors between the three steps are tritonize's own. The templates, the
validator and the tests all read these tables.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton DataType enum name, e.g. TYPE_INT32
    dims: tuple[int, ...] = (1,)
    optional: bool = False


def _opt(name: str, dtype: str, dims: tuple[int, ...] = (1,)) -> Tensor:
    return Tensor(name, dtype, dims, optional=True)


# --- the ensemble, as clients see it -------------------------------------------------------------
SAMPLING_INPUTS: tuple[Tensor, ...] = (
    _opt("top_k", "TYPE_INT32"),
    _opt("top_p", "TYPE_FP32"),
    _opt("temperature", "TYPE_FP32"),
    _opt("repetition_penalty", "TYPE_FP32"),
    _opt("presence_penalty", "TYPE_FP32"),
    _opt("frequency_penalty", "TYPE_FP32"),
    _opt("length_penalty", "TYPE_FP32"),
    _opt("min_tokens", "TYPE_INT32"),
    _opt("min_length", "TYPE_INT32"),  # genai-perf still sends the old name
    _opt("seed", "TYPE_UINT64"),
    _opt("random_seed", "TYPE_UINT64"),
    _opt("beam_width", "TYPE_INT32"),
    _opt("return_log_probs", "TYPE_BOOL"),
    _opt("return_num_input_tokens", "TYPE_BOOL"),
    _opt("return_num_output_tokens", "TYPE_BOOL"),
    _opt("stream", "TYPE_BOOL"),
    _opt("exclude_input_in_output", "TYPE_BOOL"),
    _opt("lora_task_id", "TYPE_UINT64"),
    _opt("num_return_sequences", "TYPE_INT32"),  # n sequences of each prompt, each its own response
    _opt("return_perf_metrics", "TYPE_BOOL"),  # the KV cache and timing outputs on every response
)

TEXT_INPUTS: tuple[Tensor, ...] = (
    _opt("text_input", "TYPE_STRING"),  # required: the preprocessing model names it when it is missing
    _opt("max_tokens", "TYPE_INT32"),  # required, as in tensorrtllm_backend: no default
    _opt("stop_words", "TYPE_STRING", (-1,)),
    _opt("bad_words", "TYPE_STRING", (-1,)),
    _opt("end_id", "TYPE_INT32"),
    _opt("pad_id", "TYPE_INT32"),
    # tritonize's own: false tokenizes text_input as it is, without the BOS the tokenizer would add (a prompt
    # rendered by a chat template carries its own, as transformers' apply_chat_template assumes)
    _opt("add_special_tokens", "TYPE_BOOL"),
)

# Structured output, tensorrtllm_backend's names: the guide's type (json, json_schema, regex, ebnf_grammar,
# structural_tag) and the schema, pattern or grammar. Preprocessing checks them, the engine enforces them.
GUIDED_INPUTS: tuple[Tensor, ...] = (
    _opt("guided_decoding_guide_type", "TYPE_STRING"),
    _opt("guided_decoding_guide", "TYPE_STRING"),
)

ADAPTER_INPUTS: tuple[Tensor, ...] = (
    _opt("prompt_embedding_table", "TYPE_FP16", (-1, -1)),
    _opt("prompt_vocab_size", "TYPE_INT32"),
    _opt("task_id", "TYPE_UINT64"),
)

# tensorrtllm_backend inputs (and those Triton's OpenAI frontend sends) that this repository declares and refuses
# by name when a request uses them (the preprocessing model checks them): encoder-decoder prompts, logits
# outputs, embedding bias, LoRA weights sent with a request (the repository serves the adapters it was generated
# with).
# prompt_table_extra_id is accepted: the prefix cache already tells prompt tables apart.
REFUSED_INPUTS: tuple[Tensor, ...] = (
    _opt("decoder_text_input", "TYPE_STRING"),
    _opt("return_context_logits", "TYPE_BOOL"),
    _opt("return_generation_logits", "TYPE_BOOL"),
    _opt("embedding_bias_words", "TYPE_STRING", (-1,)),
    _opt("embedding_bias_weights", "TYPE_FP32", (-1,)),
    _opt("lora_weights", "TYPE_FP16", (-1, -1)),
    _opt("lora_config", "TYPE_INT32", (-1, 3)),
    _opt("prompt_table_extra_id", "TYPE_UINT64"),
)

ENSEMBLE_INPUTS: tuple[Tensor, ...] = TEXT_INPUTS + ADAPTER_INPUTS + SAMPLING_INPUTS + GUIDED_INPUTS + REFUSED_INPUTS

# Every response: text_output, the log-probs and the token counts. batch_index when the request held
# several prompts, sequence_index when it asked for several sequences, and PERF_OUTPUTS when it set
# return_perf_metrics, as tensorrtllm_backend sends them. context_logits and generation_logits are
# declared and never sent: asking for them is refused (REFUSED_INPUTS).
PERF_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("kv_cache_alloc_new_blocks", "TYPE_INT32"),
    Tensor("kv_cache_reused_blocks", "TYPE_INT32"),
    Tensor("kv_cache_alloc_total_blocks", "TYPE_INT32"),
    Tensor("arrival_time_ns", "TYPE_INT64"),
    Tensor("first_scheduled_time_ns", "TYPE_INT64"),
    Tensor("first_token_time_ns", "TYPE_INT64"),
    Tensor("last_token_time_ns", "TYPE_INT64"),
    Tensor("acceptance_rate", "TYPE_FP32"),
    Tensor("total_accepted_draft_tokens", "TYPE_INT32"),
    Tensor("total_draft_tokens", "TYPE_INT32"),
)

# All but the last two are tensorrtllm_backend's. The last two are tritonize's own (clients that name the outputs
# they want never see them): ``finish_reason`` is empty until the final response, which carries why the
# answer ended (``length``: max_tokens; ``end``: an end id; ``stop``: a stop word; ``cancelled``);
# ``output_tokens`` holds the text of each token ``output_log_probs`` covers (filled when
# return_log_probs is set), so that the two line up token by token.
ENSEMBLE_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("text_output", "TYPE_STRING", (-1,)),
    Tensor("cum_log_probs", "TYPE_FP32", (-1,)),
    Tensor("output_log_probs", "TYPE_FP32", (-1, -1)),
    Tensor("context_logits", "TYPE_FP32", (-1, -1)),
    Tensor("generation_logits", "TYPE_FP32", (-1, -1, -1)),
    Tensor("batch_index", "TYPE_INT32"),
    Tensor("sequence_index", "TYPE_INT32"),
    *PERF_OUTPUTS,
    Tensor("num_input_tokens", "TYPE_INT32"),
    Tensor("num_output_tokens", "TYPE_INT32"),
    Tensor("finish_reason", "TYPE_STRING"),
    Tensor("output_tokens", "TYPE_STRING", (-1,)),
)

# --- preprocessing: text in, token ids out ---------------------------------------------------------
# task_id selects a p-tuning task, whose virtual tokens preprocessing puts before the prompt (as many as the
# rows of prompt_embedding_table when a request sends its own table)
# and the inputs this repository refuses (REFUSED_INPUTS), so a request that uses one fails before the engine
PRE_INPUTS: tuple[Tensor, ...] = TEXT_INPUTS + (_opt("task_id", "TYPE_UINT64"),
                                                 _opt("prompt_embedding_table", "TYPE_FP16", (-1, -1))
                                                 ) + GUIDED_INPUTS + REFUSED_INPUTS
PRE_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("input_ids", "TYPE_INT32", (-1,)),
    Tensor("input_lengths", "TYPE_INT32"),
    Tensor("request_output_len", "TYPE_INT32"),
    Tensor("end_ids", "TYPE_INT32", (-1,)),
    Tensor("pad_id", "TYPE_INT32"),
    Tensor("stop_words_list", "TYPE_INT32", (2, -1)),
    Tensor("bad_words_list", "TYPE_INT32", (2, -1)),
)

# --- engine: token ids in, token ids out (decoupled) --------------------------------------------------
# what preprocessing produced, plus the client's adapter, sampling and guided decoding inputs passed straight
# through, plus ``stop`` (tensorrtllm_backend's meaning): cancel the running request whose id this request carries
ENGINE_INPUTS: tuple[Tensor, ...] = PRE_OUTPUTS + ADAPTER_INPUTS + SAMPLING_INPUTS + GUIDED_INPUTS \
    + (_opt("stop", "TYPE_BOOL"),)
# one int32 tensor per response (runtime/packed.py): the new ids, the ids before them, log-probs, counts,
# the stream's handle (what postprocessing names in ``stop`` when Triton reports the ensemble request
# cancelled) and, on the last response, the request's metrics
ENGINE_OUTPUTS: tuple[Tensor, ...] = (Tensor("packed", "TYPE_INT32", (-1,)),)

# --- postprocessing: token ids in, text out ----------------------------------------------------------
POST_INPUTS: tuple[Tensor, ...] = ENGINE_OUTPUTS
POST_OUTPUTS: tuple[Tensor, ...] = ENSEMBLE_OUTPUTS


@dataclass(frozen=True)
class Step:
    """One ensemble step: ``inputs`` maps the model's input name to an ensemble tensor name."""

    model: str
    inputs: dict[str, str]
    outputs: dict[str, str]


def ensemble_steps(name: str) -> list[Step]:
    """Wires the three models: client tensors keep their names, inner ones get a leading ``_``."""
    pre_in = {t.name: t.name for t in PRE_INPUTS}
    pre_out = {t.name: f"_{t.name}" for t in PRE_OUTPUTS}
    engine_in = {t.name: f"_{t.name}" for t in PRE_OUTPUTS}
    engine_in.update({t.name: t.name for t in ADAPTER_INPUTS + SAMPLING_INPUTS + GUIDED_INPUTS})
    engine_out = {t.name: f"_engine_{t.name}" for t in ENGINE_OUTPUTS}
    post_in = {t.name: f"_engine_{t.name}" for t in POST_INPUTS}
    post_out = {t.name: t.name for t in POST_OUTPUTS}
    return [
        Step(f"{name}_preprocessing", pre_in, pre_out),
        Step(f"{name}_engine", engine_in, engine_out),
        Step(f"{name}_postprocessing", post_in, post_out),
    ]
