"""The ``<name>_preprocessing`` model: tokenizes prompts and stop / bad words and checks the limits.

Limits are checked here, before the engine, so that an over-long prompt is a clear error on the
request rather than a failure inside a running batch.

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
    from ..grammar import GuideError, make_guide
    from ..prompt import virtual_tokens
    from ..tokenizer import Tokenizer
    from ..triton_args import model_args
else:  # a repository's model.py, which Triton imports as "<version>.model": the runtime package is beside it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tritonize_backend.grammar import GuideError, make_guide
    from tritonize_backend.prompt import virtual_tokens
    from tritonize_backend.tokenizer import Tokenizer
    from tritonize_backend.triton_args import model_args


def _scalar(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    return tensor.as_numpy().reshape(-1)[0]


def _words(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    words = []
    for item in tensor.as_numpy().reshape(-1):
        text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        if text:
            words.append(text)
    return words


# Inputs Triton's OpenAI frontend may send that this repository does not serve yet: refused by name.
REFUSED = {
    "lora_weights": "this repository serves the LoRA adapters it was generated with: send lora_task_id alone",
    "lora_config": "this repository serves the LoRA adapters it was generated with: send lora_task_id alone",
}


def _to_words_list(sequences):
    """tensorrtllm_backend's [2, N] layout: flattened ids, then each sequence's end offset."""
    flat, offsets = [], []
    for seq in sequences:
        flat.extend(seq)
        offsets.append(len(flat))
    if not flat:
        return np.array([[0], [-1]], dtype=np.int32)[None]
    offsets += [-1] * (len(flat) - len(offsets))
    return np.array([flat, offsets], dtype=np.int32)[None]


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
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))

    def _tokenize(self, request):
        for name, why in REFUSED.items():
            if pb_utils.get_input_tensor_by_name(request, name) is not None:
                raise ValueError(f"{name} is not supported: {why}")
        try:
            make_guide(_scalar(request, "guided_decoding_guide_type"), _scalar(request, "guided_decoding_guide"))
        except GuideError as e:
            raise ValueError(str(e)) from None
        texts = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)
        if texts.size != 1:
            raise ValueError(f"text_input holds {texts.size} prompts: send one prompt per request")
        raw = texts[0]
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            raise ValueError("text_input is not valid UTF-8") from None
        if not text:
            raise ValueError("text_input is empty: send a prompt of at least one character")
        add_special = bool(_scalar(request, "add_special_tokens", True))
        ids = self.tokenizer.encode(text, add_special_tokens=add_special)
        bos = self.tokenizer.bos_id
        if add_special and bos is not None and ids[:2] == [bos, bos]:
            # a prompt that starts with the BOS token's text (a chat template's rendering, as Triton's OpenAI
            # frontend sends it) gets no second one
            ids = ids[1:]
        ids = self._virtual_tokens(request) + ids
        if len(ids) > self.max_input_len:
            raise ValueError(
                f"the prompt is {len(ids)} tokens (virtual tokens of its task included), more than this model's "
                f"max_input_len of {self.max_input_len}: shorten it, or regenerate the repository with a larger "
                "--max-input-len"
            )
        max_tokens = int(_scalar(request, "max_tokens"))
        if max_tokens <= 0:
            raise ValueError(f"max_tokens is {max_tokens}: ask for at least 1 token")
        if max_tokens > self.max_output_len:
            raise ValueError(
                f"max_tokens is {max_tokens}, more than this model's max_output_len of "
                f"{self.max_output_len}: ask for fewer, or regenerate the repository with a larger --max-output-len"
            )
        end_id = _scalar(request, "end_id")
        end_ids = [int(end_id)] if end_id is not None else self.end_ids
        pad_id = _scalar(request, "pad_id")
        pad_id = int(pad_id) if pad_id is not None else self.pad_id
        stop = [self.tokenizer.encode(w, add_special_tokens=False) for w in _words(request, "stop_words")]
        bad = [self.tokenizer.encode(w, add_special_tokens=False) for w in _words(request, "bad_words")]
        return [
            pb_utils.Tensor("input_ids", np.array([ids], dtype=np.int32)),
            pb_utils.Tensor("input_lengths", np.array([[len(ids)]], dtype=np.int32)),
            pb_utils.Tensor("request_output_len", np.array([[max_tokens]], dtype=np.int32)),
            pb_utils.Tensor("end_ids", np.array([end_ids or [-1]], dtype=np.int32)),
            pb_utils.Tensor("pad_id", np.array([[pad_id]], dtype=np.int32)),
            pb_utils.Tensor("stop_words_list", _to_words_list([s for s in stop if s])),
            pb_utils.Tensor("bad_words_list", _to_words_list([s for s in bad if s])),
        ]

    def _virtual_tokens(self, request):
        task = _scalar(request, "task_id")
        table = pb_utils.get_input_tensor_by_name(request, "prompt_embedding_table")
        if table is not None:  # the request's own table, [1, n, hidden]: n virtual tokens
            if task is not None:
                raise ValueError("send task_id or prompt_embedding_table, not both")
            shape = table.as_numpy().shape
            if len(shape) < 2 or shape[-2] < 1:
                raise ValueError(f"prompt_embedding_table has shape {list(shape)}: send [1, n, hidden] with n >= 1")
            return virtual_tokens(self.vocab_size, shape[-2])
        if task is None:
            return []
        task = int(task)
        if task not in self.tasks:
            served = ", ".join(map(str, sorted(self.tasks))) or "none"
            raise ValueError(f"task_id {task} has no p-tuning table in this model (it serves: {served}): "
                             "send one of those, or no task_id")
        return virtual_tokens(self.vocab_size, self.tasks[task])
