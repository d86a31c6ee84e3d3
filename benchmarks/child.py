"""Source code of the child process the benchmarks start (``python -c CODE``): it pins
torch's thread count from an environment variable, may run more setup, then starts
fairseq-hydra-train with the child's own arguments."""


def child_code(threads_env: str, setup: str = "") -> str:
    """The child's code: ``threads_env`` names the variable with the thread count (0 = torch's
    default); ``setup`` is more code run before fairseq starts (``os``, ``sys``, ``torch`` imported)."""
    return f"""
import os, sys
import torch
threads = int(os.environ.get("{threads_env}", "0"))
if threads > 0:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass
{setup}
sys.argv[0] = "fairseq-hydra-train"
from fairseq_cli.hydra_train import cli_main
cli_main()
"""
