"""The ``<name>_preprocessing`` model: tokenizes prompts and stop / bad words and checks the limits.

Limits are checked here, before the engine, so that an over-long prompt is a clear error on the
request rather than a failure inside a running batch. So are the inputs a request must send
(``text_input`` and ``max_tokens``: the ensemble declares them optional only so that a request lacking
one reaches this model, which names it) and the tensorrtllm_backend inputs this repository declares but
does not serve (``REFUSED``).

A request may hold several prompts (``text_input`` of shape [N, 1], every input with N rows, as
tensorrtllm_backend's clients send with ``--batch-inputs``): each row is tokenized with its own inputs,
and the outputs hold N rows, the prompts padded to the longest with the pad id (``input_lengths`` says
how long each is).

A request with a ``task_id`` of a p-tuning task gets that task's virtual tokens before its prompt, as
ids ``vocab_size + j`` (TensorRT-LLM's convention); the engine replaces their embeddings with the
task's table. A request that sends its own ``prompt_embedding_table`` ([1, n, hidden]) gets n of them.

A guide (``guided_decoding_guide_type`` / ``guided_decoding_guide``) is checked here (its type, its text,
a schema that is JSON) and goes to the engine model straight from the ensemble's inputs.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

if __name__.startswith("tritonize."):  # imported from the tritonize package (tests, the Python API)
    from ..grammar import make_guide
    from ..prompt import virtual_tokens
    from ..tokenizer import Tokenizer
    from ..triton_args import model_args
else:  # a repository's model.py, which Triton imports as "<version>.model": the runtime package is beside it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tritonize_backend.grammar import make_guide
    from tritonize_backend.prompt import virtual_tokens
    from tritonize_backend.tokenizer import Tokenizer
    from tritonize_backend.triton_args import model_args

# tensorrtllm_backend inputs that the ensemble declares and this repository cannot honour: using one is an
# error naming it (a false flag or an empty text is not a use).
REFUSED = {
    "decoder_text_input": "it is the decoder prompt of encoder-decoder models, and this model is decoder-only",
    "return_context_logits": "the engine returns no logits (output_log_probs has the log-probs of the "
                             "generated tokens)",
    "return_generation_logits": "the engine returns no logits (output_log_probs has the log-probs of the "
                                "generated tokens)",
    "embedding_bias_words": "this repository applies no embedding bias",
    "embedding_bias_weights": "this repository applies no embedding bias",
    "lora_weights": "LoRA adapters are served from the repository: send lora_task_id alone",
    "lora_config": "LoRA adapters are served from the repository: send lora_task_id alone",
}
REQUIRED = {
    "text_input": "send the prompt as a BYTES tensor of shape [1, 1]",
    "max_tokens": "send the number of tokens to generate as an INT32 tensor of shape [1, 1]",
}


def _array(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _rows(array, n, name):
    """``array`` as n rows (the batch dimension first), one value or sequence per prompt."""
    if array.ndim == 0:
        array = array.reshape(1, 1)
    if array.shape[0] != n:
        raise ValueError(f"{name} has {array.shape[0]} rows but text_input has {n}: send one row per prompt")
    return array.reshape(n, -1)


def _used(array):
    """Whether an input a repository refuses asks for anything (false and empty values ask for nothing)."""
    if array.dtype == np.bool_:
        return bool(array.any())
    if array.dtype == np.object_:
        return any(item not in (b"", "") for item in array.reshape(-1))
    return array.size > 0


def _text(item, name):
    try:
        return item.decode("utf-8") if isinstance(item, bytes) else str(item)
    except UnicodeDecodeError:
        raise ValueError(f"{name} is not valid UTF-8") from None


def _to_words_list(sequences):
    """tensorrtllm_backend's [2, N] layout: flattened ids, then each sequence's end offset."""
    flat, offsets = [], []
    for seq in sequences:
        flat.extend(seq)
        offsets.append(len(flat))
    if not flat:
        return np.array([[0], [-1]], dtype=np.int32)
    offsets += [-1] * (len(flat) - len(offsets))
    return np.array([flat, offsets], dtype=np.int32)


def _stack(rows, fill):
    """Rows of different lengths as one [N, longest] array, padded with ``fill``."""
    width = max(len(row) for row in rows)
    out = np.full((len(rows), width), fill, dtype=np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _stack_words(lists):
    """[N, 2, longest] from per-prompt [2, k] word lists (ids padded with 0, offsets with -1)."""
    width = max(a.shape[1] for a in lists)
    out = np.zeros((len(lists), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for i, a in enumerate(lists):
        out[i, :, : a.shape[1]] = a
    return out


class TritonPythonModel:
    def initialize(self, args):
        _, params, here = model_args(args)
        self.tokenizer = Tokenizer(os.path.join(here, params["tokenizer_dir"]))
        self.max_input_len = int(params["max_input_len"])
        self.max_output_len = int(params["max_output_len"])
        self.end_ids = [int(x) for x in json.loads(params["end_ids"])]
        self.pad_id = int(params["pad_id"])
        self.vocab_size = int(params["vocab_size"])
        self.tasks = {int(k): int(v) for k, v in json.loads(params.get("ptuning_tasks") or "{}").items()}

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            return pb_utils.InferenceResponse(output_tensors=self._tokenize(request))
        except ValueError as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))

    def _tokenize(self, request):
        for name, fix in REQUIRED.items():
            if pb_utils.get_input_tensor_by_name(request, name) is None:
                raise ValueError(f"{name} is required and missing: {fix}")
        for name, why in REFUSED.items():
            array = _array(request, name)
            if array is not None and _used(array):
                raise ValueError(f"{name} is not supported by this model: {why}")
        texts = _array(request, "text_input")
        n = texts.shape[0] if texts.ndim else 1
        texts = _rows(texts, n, "text_input")
        if texts.shape[1] != 1:
            raise ValueError(f"text_input has shape {list(texts.shape)}: send one prompt per row, shape [N, 1]")
        inputs = {}
        for name in ("max_tokens", "end_id", "pad_id", "task_id", "stop_words", "bad_words", "add_special_tokens",
                     "guided_decoding_guide_type", "guided_decoding_guide"):
            array = _array(request, name)
            if array is not None:
                inputs[name] = _rows(array, n, name)
        table = _array(request, "prompt_embedding_table")
        prompts = []
        for i in range(n):
            row = {k: v[i] for k, v in inputs.items()}
            try:
                make_guide(*(row[k][0] if k in row else None
                             for k in ("guided_decoding_guide_type", "guided_decoding_guide")))
                prompts.append(self._prompt(texts[i][0], row, table))
            except ValueError as e:  # a bad guide (GuideError) included
                raise ValueError(f"prompt {i} of {n}: {e}" if n > 1 else str(e)) from None
        ids, lengths, max_tokens, end_ids, pad_ids, stops, bads = zip(*prompts, strict=True)
        return [
            pb_utils.Tensor("input_ids", _stack(ids, self.pad_id)),
            pb_utils.Tensor("input_lengths", np.array(lengths, dtype=np.int32).reshape(n, 1)),
            pb_utils.Tensor("request_output_len", np.array(max_tokens, dtype=np.int32).reshape(n, 1)),
            pb_utils.Tensor("end_ids", _stack(end_ids, -1)),
            pb_utils.Tensor("pad_id", np.array(pad_ids, dtype=np.int32).reshape(n, 1)),
            pb_utils.Tensor("stop_words_list", _stack_words(stops)),
            pb_utils.Tensor("bad_words_list", _stack_words(bads)),
        ]

    def _prompt(self, raw, row, table):
        """One prompt's (ids, length, max_tokens, end ids, pad id, stop words list, bad words list)."""
        text = _text(raw, "text_input")
        if not text:
            raise ValueError("text_input is empty: send a prompt of at least one character")
        add_special = bool(row["add_special_tokens"][0]) if "add_special_tokens" in row else True
        ids = self.tokenizer.encode(text, add_special_tokens=add_special)
        bos = self.tokenizer.bos_id
        if add_special and bos is not None and ids[:2] == [bos, bos]:
            # a prompt that starts with the BOS token's text (a chat template's rendering, as Triton's OpenAI
            # frontend sends it) gets no second one
            ids = ids[1:]
        ids = self._virtual_tokens(row.get("task_id"), table) + ids
        if len(ids) > self.max_input_len:
            raise ValueError(
                f"the prompt is {len(ids)} tokens (virtual tokens of its task included), more than this model's "
                f"max_input_len of {self.max_input_len}: shorten it, or regenerate the repository with a larger "
                "--max-input-len"
            )
        max_tokens = int(row["max_tokens"][0])
        if max_tokens <= 0:
            raise ValueError(f"max_tokens is {max_tokens}: ask for at least 1 token")
        if max_tokens > self.max_output_len:
            raise ValueError(
                f"max_tokens is {max_tokens}, more than this model's max_output_len of "
                f"{self.max_output_len}: ask for fewer, or regenerate the repository with a larger --max-output-len"
            )
        end_ids = [int(row["end_id"][0])] if "end_id" in row else self.end_ids
        pad_id = int(row["pad_id"][0]) if "pad_id" in row else self.pad_id
        stop = [self.tokenizer.encode(w, add_special_tokens=False) for w in self._words(row.get("stop_words"))]
        bad = [self.tokenizer.encode(w, add_special_tokens=False) for w in self._words(row.get("bad_words"))]
        return (ids, len(ids), max_tokens, end_ids or [-1], pad_id, _to_words_list([s for s in stop if s]),
                _to_words_list([s for s in bad if s]))

    @staticmethod
    def _words(items):
        if items is None:
            return []
        return [word for word in (_text(item, "stop_words / bad_words") for item in items) if word]

    def _virtual_tokens(self, task, table):
        if table is not None:  # the request's own table, [N, n, hidden]: n virtual tokens
            if task is not None:
                raise ValueError("send task_id or prompt_embedding_table, not both")
            shape = table.shape
            if len(shape) < 2 or shape[-2] < 1:
                raise ValueError(f"prompt_embedding_table has shape {list(shape)}: send [1, n, hidden] with n >= 1")
            return virtual_tokens(self.vocab_size, shape[-2])
        if task is None:
            return []
        task = int(task[0])
        if task not in self.tasks:
            served = ", ".join(map(str, sorted(self.tasks))) or "none"
            raise ValueError(f"task_id {task} has no p-tuning table in this model (it serves: {served}): "
                             "send one of those, or no task_id")
        return virtual_tokens(self.vocab_size, self.tasks[task])
