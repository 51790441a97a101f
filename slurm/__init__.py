"""kompakt on Slurm: sbatch templates (slurm/templates/), cluster profiles (slurm/clusters/*.env)
and `kompakt slurm submit|status` (submit.py), rendering each stage of a recipe as jobs (jobs.py).

The templates hold no hyperparameters and no paths of anyone's: the recipe holds the former, the
rendered command line the latter. Tests run them on a real single-node cluster (tests/slurm/).
"""
