"""The dashboard at ``/`` (placeholder until it is built)."""

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter()
