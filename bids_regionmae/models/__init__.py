"""Models: NeuroSTORM-style shifted-window Mamba encoder, MAE decoder, heads, checkpoints.

Pure PyTorch (no neuroimaging libraries). Typical use::

    from bids_regionmae.models import create_mae, resolve_backend

    mae = create_mae("tiny", backend="auto")        # or "neurostorm"
    recon = mae(x, token_mask)                       # x (B,1,X,Y,Z,T); mask (B,D,H,W,T) bool
    feats = mae.encoder(x)                           # (B, C_last, d, h, w, T)
    used = resolve_backend("auto", torch.device("cpu"))  # "torch"

See :mod:`.registry` for the variants, :mod:`.mamba` for the backends,
:mod:`.heads` for fine-tuning, :mod:`.checkpoint` for the weights format and
:mod:`.model_dir` for model directories (``ModelDir.save``/``ModelDir.open``,
the only code that writes or reads ``output_dir/models/<name>/``).
"""

from bids_regionmae.models.checkpoint import (
    ImportReport,
    import_neurostorm_checkpoint,
    load_model,
    load_neurostorm_mae,
    read_model_metadata,
    save_model,
)
from bids_regionmae.models.heads import MODES, TASKS, FinetuneModel, build_head, head_output_dim
from bids_regionmae.models.mamba import (
    BACKENDS,
    Mamba,
    mamba_ssm_available,
    release_workspace,
    resolve_backend,
    selective_scan,
)
from bids_regionmae.models.neurostorm import (
    NeuroSTORMEncoder,
    NeuroSTORMMAE,
    count_parameters,
    from_neurostorm_keys,
    patchify,
    to_neurostorm_keys,
    unpatchify,
)
from bids_regionmae.models.registry import create_encoder, create_mae, get_spec, list_variants, register_variant
from bids_regionmae.models.spec import ModelSpec, SpecError

#: The MAE class under the name the pretraining code uses.
MAE = NeuroSTORMMAE

__all__ = [
    "BACKENDS", "MAE", "MODES", "TASKS", "FinetuneModel", "ImportReport", "Mamba", "ModelSpec",
    "NeuroSTORMEncoder", "NeuroSTORMMAE", "SpecError", "build_head", "count_parameters", "create_encoder",
    "create_mae", "from_neurostorm_keys", "get_spec", "head_output_dim", "import_neurostorm_checkpoint",
    "list_variants", "load_model", "load_neurostorm_mae", "mamba_ssm_available", "patchify",
    "read_model_metadata", "register_variant", "release_workspace", "resolve_backend", "save_model",
    "selective_scan", "to_neurostorm_keys", "unpatchify",
]
