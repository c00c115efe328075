"""Google Confidential Space: the hub launches each job on a Confidential VM (see :mod:`.platform`)."""

from .platform import ConfidentialSpacePlatform

__all__ = ["ConfidentialSpacePlatform"]
