"""The Triton Python-backend model files of a repository, as plain modules.

``tritonize generate`` copies each one verbatim into ``<name>_<step>/<version>/model.py``, beside the
runtime package (``tritonize_backend``); what differs between repositories reaches them through their
config.pbtxt parameters (``args["model_config"]``), never through templating. Imported as
``tritonize.runtime.triton.*`` (tests, the Python API) they use the package's relative imports; loaded
by Triton (as ``<version>.model``) they import the runtime package copied next to the file.
"""
