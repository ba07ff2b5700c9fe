"""The choices a repository makes about its runtime, named once: the repository layer offers them as
flags, the engine model acts on them."""

# torch: tritonize's own runtime; trtllm: tensorrt_llm.LLM (PyTorch backend); trtllm-engine: prebuilt
# TensorRT-LLM engines through the executor; auto: trtllm where the server has tensorrt_llm and a GPU,
# else torch (decided by the engine model when it loads)
RUNTIMES = ("torch", "trtllm", "trtllm-engine", "auto")
# How a trtllm-engine engine over several GPUs is launched: one tritonserver per MPI rank (leader), or one
# whose executor spawns its workers (orchestrator)
MULTI_GPU_MODES = ("leader", "orchestrator")
