"""Caduceus anonymizer: a mercure processing module for DICOM PS3.15 Annex E de-identification."""

__version__ = "0.1.0"
