"""Checkpoints of pipeline runs on ``torch.distributed.checkpoint`` (DCP), and their consolidation.

``trainer.save_checkpoint(path)`` and ``ModelCheckpoint`` write ``path/`` as a directory: a DCP
checkpoint of every tensor, keyed by the LightningModule's own names and written once whatever
the number of ranks holding it, plus ``meta.pt`` with the rest of Lightning's checkpoint dict
(:mod:`.files` has the layout and how a save commits). The keys do not depend on the layout, so a
checkpoint saved at one P x V x D resumes at any other: each rank reads only what it holds
(:mod:`.sharded`). :func:`consolidate` (``bigmac consolidate DIR OUT.ckpt``) turns one into an
ordinary one-process Lightning checkpoint, optimizer state included.
"""

from .consolidation import ShardedCheckpointIO, consolidate
from .held import gather_full_state_dict, load_owned_state_dict, owned_state_dict

__all__ = [
    "ShardedCheckpointIO",
    "consolidate",
    "gather_full_state_dict",
    "load_owned_state_dict",
    "owned_state_dict",
]
