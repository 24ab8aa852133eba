"""The command line: ``vllm-custom-patches`` (``main``) and its upgrade commands (``upgrade``)."""
