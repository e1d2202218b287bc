"""vLLM-facing model code of the plugin (imported only inside vLLM processes, lazily by the model registry)."""
