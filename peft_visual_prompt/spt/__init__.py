"""Self-Prompt Tuning (SPT): data-driven prompt initialisation (Wang et al., ICML 2024, arXiv 2402.02382).

SPT initialises the prompts of layer i with prototypes of the tokens layer i receives on the target data.
`initialize_prompts` computes them in one pass of the frozen backbone over a dataloader, with bounded memory, on one
process or sharded over the ranks of an `accelerate` run, and writes them into an adapter's prompts.
`prompt_patch_nmi` and `PromptPatchNMICallback` measure the prompt-patch mutual information that motivates the
method. How it works, module by module: docs/spt.md.
"""

from .clustering import KMEANS_MAX_ITER, KMEANS_TOL, KMeansResult, kmeans
from .initialize import DEFAULT_MAX_TOKENS_PER_LAYER, initialize_prompts
from .keys import priority_keys
from .nmi import PromptPatchNMICallback, attention_nmi, nmi_from_joint, nmi_from_logits, nmi_from_tokens, prompt_patch_nmi

__all__ = [
    "DEFAULT_MAX_TOKENS_PER_LAYER",
    "KMEANS_MAX_ITER",
    "KMEANS_TOL",
    "KMeansResult",
    "attention_nmi",
    "PromptPatchNMICallback",
    "initialize_prompts",
    "kmeans",
    "nmi_from_joint",
    "nmi_from_logits",
    "nmi_from_tokens",
    "priority_keys",
    "prompt_patch_nmi",
]
