"""Every classical baseline, imported so that its family registers (the model registry imports this)."""

from scaling.models.baselines import popularity  # noqa: F401
from scaling.models.baselines import bpr_mf  # noqa: F401
from scaling.models.baselines import neighbourhood  # noqa: F401
from scaling.models.baselines import als  # noqa: F401
from scaling.models.baselines import funk_mf  # noqa: F401
from scaling.models.baselines import neumf, lightgcn  # noqa: F401
from scaling.models.baselines import two_tower, bert4rec  # noqa: F401
from scaling.models.baselines import deepfm, dcnv2, autoint, xdeepfm  # noqa: F401  (the CTR zoo)
from scaling.models.baselines import finalmlp, masknet, wide_deep, linear_fm  # noqa: F401
