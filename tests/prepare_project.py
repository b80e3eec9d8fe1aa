"""A throw-away compendium for testing ``seglab prepare`` and its Slurm arrays.

``make_prepare_project(root, cohort_dir)`` copies the real schemas of notebooks 01, 02, 05
and 06 (so that ``seglab.workflow.prepare`` sees the same params as in the study), writes a ``tiny``
profile (the ``tiny-xs`` net, 1 epoch of 4 crops of 64 px, on a tiny simulated cohort) and a
probe notebook ``02_label_efficiency`` that makes exactly the fine-tunes of the real notebook
02 (``e2_label_efficiency.label_budget_jobs`` + the generic reference, through ``finetune_many``) and
records in its summary how many it had to train itself, and a probe ``05_downstream`` that
makes the real notebook 05's inference (both models, ``predict_cohort`` over the shards) and
records per model the tiles it covered and how many it had to segment itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from probe_project import notebook, project_skeleton

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_baseline_vs_finetune", "02_label_efficiency", "05_downstream", "06_leave_one_marker_out")

TINY_DEFAULTS = """\
cohort_dir: {cohort_dir}
seed: 0
baseline_model: tiny-xs
diameter_px: null
epochs: 1
learning_rate: 0.01
weight_decay: 0.0001
batch_size: 4
bsize: 64
nimg_per_epoch: 4
flow_threshold: 0.4
cellprob_threshold: 0.0
min_size: 5
"""

TINY = {
    "01_baseline_vs_finetune": "markers: [gfap]\nn_jobs: 1\ntorch_threads: 1\n",
    "02_label_efficiency": "budgets: [2, 1]\nrepeats: 1\nreference_full_data: true\nn_jobs: 1\ntorch_threads: 1\n"
                           "rescore_per_image: false\n",
    "05_downstream": "n_shards: 2\nshards: null\nbatch_tiles: 4\nbootstrap_B: 0\n",
    "06_leave_one_marker_out": "lomo_markers: [gfap]\nn_jobs: 1\ntorch_threads: 1\n",
}

E2_CELLS = [
    ("parameters", 'cohort_dir = ""\nseed = 0\nbaseline_model = "tiny-xs"\nepochs = 1\nlearning_rate = 0.01\n'
                   "weight_decay = 0.0001\nbatch_size = 4\nbsize = 64\nnimg_per_epoch = 4\nbudgets = [1]\nrepeats = 1\n"
                   'reference_full_data = True\ntorch_threads = 1\nrun_dir = None\nprofile = "interactive"'),
    ("code", "import torch\ntorch.set_num_threads(1)\nfrom seglab.workflow.runs import attach\n"
             "from seglab.config.settings import TrainSettings\n"
             "from seglab.experiments import e2_label_efficiency\nfrom seglab.segment import finetuning\n"
             "run = attach('02_label_efficiency', run_dir, profile)"),
    # the fine-tunes of notebooks/02_label_efficiency.ipynb (section 2), as it makes them
    ("code", "tp = TrainSettings(epochs=epochs, learning_rate=learning_rate, weight_decay=weight_decay,\n"
             "    batch_size=batch_size, bsize=bsize, nimg_per_epoch=nimg_per_epoch, seed=seed)\n"
             "jobs = e2_label_efficiency.label_budget_jobs(baseline_model, cohort_dir, sorted(set(budgets)), repeats, training=tp)\n"
             "if reference_full_data:\n"
             "    jobs.append(dict(base=baseline_model, cohort_dir=cohort_dir, variant='generic', training=tp))\n"
             "fits = finetuning.finetune_many(jobs, n_jobs=1)\n"
             "run.summary(n_models=len(fits), n_trained_here=sum(not f['cached'] for f in fits))"),
]

E5_CELLS = [
    ("parameters", 'cohort_dir = ""\nseed = 0\nbaseline_model = "tiny-xs"\ndiameter_px = None\nepochs = 1\n'
                   "learning_rate = 0.01\nweight_decay = 0.0001\nbatch_size = 4\nbsize = 64\nnimg_per_epoch = 4\n"
                   "flow_threshold = 0.4\ncellprob_threshold = 0.0\nmin_size = 5\n"
                   'predictions_dir = "data/predictions"\nn_shards = 2\nshards = None\nbatch_tiles = 4\n'
                   'inference_batch_size = None\nrun_dir = None\nprofile = "interactive"'),
    ("code", "import torch\ntorch.set_num_threads(1)\nfrom seglab.workflow.runs import attach\n"
             "from seglab.config.settings import MaskSettings, TrainSettings\n"
             "from seglab.core import paths\nfrom seglab.segment import cohort_prediction, finetuning\n"
             "run = attach('05_downstream', run_dir, profile)"),
    # the models and the inference of notebooks/05_downstream.ipynb (sections 1-2), as it makes them
    ("code", "params = dict(cohort_dir=cohort_dir, seed=seed, baseline_model=baseline_model, diameter_px=diameter_px,\n"
             "    epochs=epochs, learning_rate=learning_rate, weight_decay=weight_decay, batch_size=batch_size,\n"
             "    bsize=bsize, nimg_per_epoch=nimg_per_epoch, flow_threshold=flow_threshold,\n"
             "    cellprob_threshold=cellprob_threshold, min_size=min_size)\n"
             "tp = TrainSettings.from_params(params)\n"
             "finetuned_cached = finetuning.cached_model(base=baseline_model, cohort_dir=cohort_dir, variant='generic',\n"
             "    training=tp) is not None\n"
             "model_specs = {'baseline': baseline_model,\n"
             "               'finetuned': str(finetuning.finetune(baseline_model, cohort_dir, 'generic', training=tp))}\n"
             "predictions = {name: cohort_prediction.predict_cohort(spec, paths.resolve(cohort_dir) / 'tiles',\n"
             "    MaskSettings.from_params(params),\n"
             "    name=name, root=predictions_dir, n_shards=n_shards, shards=shards, batch_tiles=batch_tiles,\n"
             "    batch_size=inference_batch_size) for name, spec in model_specs.items()}\n"
             "run.summary(finetuned_cached=finetuned_cached,\n"
             "            **{f'n_tiles_{k}': p.n_tiles for k, p in predictions.items()},\n"
             "            **{f'n_predicted_here_{k}': p.n_predicted for k, p in predictions.items()})"),
]


def make_prepare_project(root: Path, cohort_dir: Path, needs_01: bool = False) -> Path:
    """The project: experiments 01, 02, 05, 06 (02 needs nothing; 05 and 06 need 01), profile ``tiny``."""
    e1 = "01_baseline_vs_finetune"
    root = project_skeleton(root, "tiny", {e1: ("E1 probe", []),
                                           "02_label_efficiency": ("E2 probe", [e1] if needs_01 else []),
                                           "05_downstream": ("E5 probe", [e1]),
                                           "06_leave_one_marker_out": ("E6 probe", [e1])})
    shutil.copy(REPO / "params" / "schema" / "_shared.yaml", root / "params" / "schema" / "_shared.yaml")  # the block the schemas include
    for name in NOTEBOOKS:
        shutil.copy(REPO / "params" / "schema" / f"{name}.yaml", root / "params" / "schema" / f"{name}.yaml")
        # the demo profile's values, with the tiny ones on top
        own = {**(yaml.safe_load((REPO / "params" / "demo" / f"{name}.yaml").read_text()) or {}),
               **yaml.safe_load(TINY[name])}
        (root / "params" / "tiny" / f"{name}.yaml").write_text(yaml.safe_dump(own, sort_keys=False))
    (root / "params" / "tiny" / "defaults.yaml").write_text(TINY_DEFAULTS.format(cohort_dir=cohort_dir))
    import nbformat

    nbformat.write(notebook(E2_CELLS), str(root / "notebooks" / "02_label_efficiency.ipynb"))
    nbformat.write(notebook(E5_CELLS), str(root / "notebooks" / "05_downstream.ipynb"))
    for name in ("01_baseline_vs_finetune", "06_leave_one_marker_out"):   # stubs: 01 runs (does nothing), 06 never
        nbformat.write(notebook([("parameters", "run_dir = None")]), str(root / "notebooks" / f"{name}.ipynb"))
    return root
