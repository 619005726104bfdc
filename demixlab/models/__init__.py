"""Model families. Importing this package registers every built-in family."""
from .registry import Family, family_names, get_family, register_family  # noqa: F401
from . import umx  # noqa: F401
from . import xumx  # noqa: F401
from . import hdemucs  # noqa: F401
from . import htdemucs  # noqa: F401
from . import slicq_cdae  # noqa: F401
