"""The research experiment (``clinfusediff experiment``): a powered, resumable comparison of every
fusion method and reference on one large synthetic cohort, under the all-subsets protocol.

* ``settings``  the ``sweep`` section of ``Resources/Configs/research.yaml`` (sizes, seeds, methods)
* ``data``      cohort generation (parallel), preprocessing (parallel, cached), arrays in memory
* ``stage1``    image/tabular encoders trained once per stage-1 seed, then frozen tokens
* ``methods``   every fusion method and reference, trained on the frozen tokens
* ``sweep``     the resumable unit scheduler (one file per finished unit) and the verdict
"""

from .settings import SweepConfig, load_research_config

__all__ = ["SweepConfig", "load_research_config"]
