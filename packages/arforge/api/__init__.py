"""The Python API: load what a run trained, generate images, reconstruct images (docs/api.md).

::

    import arforge

    run = arforge.load("quickstart/pipeline")          # experiment/run, a run id, a folder, a .gin file
    samples = run.generate(classes=[3] * 8, guidance=1.5, seed=0)
    samples.grid()                                     # a PIL image (shown inline in a notebook)
    recon = arforge.reconstruct(run, samples.images)   # tokenize and decode again

Where a run's objects come from
    Every launch writes ``run.json`` into its output folder: the MLflow run id, the launch file
    and every resolved gin binding (docs/tracking.md#resuming-and-runjson). :func:`load` rebuilds
    the components from those recorded bindings, not from the launch file, so a run still loads
    after its launch file changed or moved, from any working directory. The weights come from
    the run's own checkpoints (``<output>/checkpoints``, EMA when there is one, as ``jobs.sample``
    does) or, for a sample run, from the checkpoints and loaders its bindings name
    (``loaders.arforge_checkpoint``, ``loaders.official_*``, docs/checkpoints.md#loading).

    ``outputs:`` and ``pipeline:`` paths in those bindings resolve against the run's own home and
    pipeline folder (taken from where the run folder lies), not the caller's working directory.

What each kind of run gives
    ============================  ===========================================================
    job of the run                model, tokenizer
    ============================  ===========================================================
    ``jobs.sample``               the model and tokenizer it sampled with, and its guidance
    ``jobs.train_ar``             the trained model; the tokenizer whose codes it trained on
                                  (named by the codes' ``manifest.json``)
    ``jobs.train_tokenizer``      the tokenizer only
    ``jobs.pipeline`` (a study    its sample stage, else its AR stage
    trial is one)
    ============================  ===========================================================

``load`` replaces gin's global configuration with the loaded run's (as ``arforge run`` does);
the objects it returns do not depend on gin afterwards.

The modules, one concern each: :mod:`.runs` finds a run's folder and reads its ``run.json``;
:mod:`.bindings` parses recorded bindings back into gin and builds what they name;
:mod:`.loaded` is :class:`LoadedRun` and :func:`load`; :mod:`.samples` (:func:`generate`) and
:mod:`.reconstruction` (:func:`reconstruct`) make images from what was loaded. They are named
after what they return, so that no module is shadowed by the function of the same name exported
here. None imports torch, gin or PIL at module level: ``import arforge`` imports this package on
first use of ``arforge.load``, and a function imports what it needs when it runs.
"""

from __future__ import annotations

from arforge.api.samples import Samples, generate
from arforge.api.loaded import LoadedRun, load
from arforge.api.reconstruction import Reconstruction, reconstruct
from arforge.api.runs import LoadError, find_run_dir

__all__ = ["LoadError", "LoadedRun", "Samples", "Reconstruction", "load", "generate", "reconstruct",
           "find_run_dir"]
