"""The model repository: options (``spec``, ``options``), what a checkpoint declares (``checkpoint``),
rendering (``render``, ``build``, templates for config.pbtxt and Kubernetes), the manifest, static
validation, adapters conversion into the repository and TensorRT-LLM engine builds."""
