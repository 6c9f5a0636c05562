"""Test helpers: a tiny multimodal LLM and the multi-process harness the runtime tests share."""
