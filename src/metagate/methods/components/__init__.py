"""Pieces several methods share (DESIGN.md: "shared pieces live once under nn/ or methods/components/")."""
