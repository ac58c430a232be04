# %% [markdown]
# # The quickstart from Python
#
# Load what `arforge run experiments/quickstart/pipeline.gin` trained, sample eight 3s and
# look at them, then put them through the tokenizer and back (docs/api.md). Runs from any
# working directory: the run is found under `$ARFORGE_HOME/outputs` or the checkout's
# `arforge_runs/`. Open it as a notebook (Jupyter with jupytext, VS Code) or run it as a script:
# `python docs/quickstart_api.py`; `tests/test_api.py` runs it on a tiny trained run.

# %%
import arforge

run = arforge.load("quickstart/pipeline")  # the pipeline's sample stage: its model, tokenizer, guidance
samples = run.generate(classes=[3] * 8, guidance=1.5, seed=0)  # uint8 (8, 16, 16, 3)
samples.grid().save("threes.png")  # in a notebook, a cell ending in `samples` shows the grid
recon = arforge.reconstruct(run, samples.images)  # tokens and back: originals above, reconstructions below
recon.grid().save("threes_reconstructed.png")
print(run, samples.images.shape, recon.ids.shape)
