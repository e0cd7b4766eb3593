"""A vLLM worker extension that loads new student weights: the weight-sync path of `opdkit.rollout.vllm`.

This file runs INSIDE the vLLM server's workers (its own environment: torch + safetensors, no opdkit). opdkit
copies it to a temp dir on the server's PYTHONPATH as `opdkit_vllm_worker.py` and starts the server with
`--worker-extension-cls opdkit_vllm_worker.WeightSync` (and VLLM_SERVER_DEV_MODE=1, which exposes vLLM's
`/collective_rpc` and `/reset_prefix_cache`). A push is then:

    trainer: save the student's (merged) state dict as safetensors -> POST /collective_rpc
             {"method": "opdkit_load_weights", "args": [path]} -> POST /reset_prefix_cache

`collective_rpc` runs the method in every worker (tensor-parallel ranks too); each loads the file and hands the
HF-named tensors to vLLM's in-place `reload_weights` (it maps q/k/v and gate/up into the fused layers, skips a tied
lm_head and redoes the kernel-format processing of each layer). The prefix cache is reset because its KV entries were computed with the old weights. TRL's
`VLLMClient` and vLLM's RLHF examples push tensors through NCCL instead (GPU); a file is the path that works for a
stock server on CPU and on one node; see docs/rollouts.md for the multi-node plan.
"""

from __future__ import annotations

import hashlib
import json


class WeightSync:
    def opdkit_load_weights(self, path: str) -> str:
        from safetensors.torch import load_file

        state = load_file(path, device=str(self.device) if hasattr(self, "device") else "cpu")
        if hasattr(self, "reload_weights"):
            # vLLM's in-place reload: loads checkpoint-format (HF-named) tensors layer by layer and re-runs each
            # layer's post-load processing (on CPU the linear weights are repacked for oneDNN and the original
            # parameters emptied, so a plain model.load_weights would no longer fit them)
            self.reload_weights(weights_iterator=iter(state.items()), is_checkpoint_format=True)
            repacked = self._opdkit_repack_kept_weights()
            return json.dumps({"tensors": len(state), "path": "reload_weights", "repacked": repacked})
        loaded = self.model_runner.model.load_weights(weights=iter(state.items()))
        return json.dumps({"tensors": len(state), "loaded": len(loaded) if loaded is not None else None})

    def _opdkit_repack_kept_weights(self) -> int:
        """vLLM on CPU keeps a prepacked copy of layers whose weight stays in place (the embedding, which a tied
        lm_head multiplies by): the in-place reload updates the weight but not that copy. Re-dispatch them."""
        try:
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
            from vllm.platforms import current_platform
        except ImportError:
            return 0
        if not current_platform.is_cpu():
            return 0
        n = 0
        for module in self.model_runner.model.modules():
            w = getattr(module, "weight", None)
            if hasattr(module, "cpu_linear") and w is not None and w.ndim == 2 and w.numel():
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
                n += 1
        return n

    def opdkit_weights_digest(self) -> str:
        """SHA-256 over the model's parameters (tests: the weights changed, or did not)."""
        h = hashlib.sha256()
        for name, p in sorted(self.model_runner.model.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()
