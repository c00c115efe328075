"""DCR's provider-side tools: synthetic versions of datasets and their fidelity reports.

Not part of the trusted computing base. ``dcr provider add --synthesize NAME`` (in ``dcr_enclave``) finds the
synthesizers here through the ``dcr.synthesizers`` entry-point group, so the enclave distribution never
imports a synthesis library. Install with ``pip install 'jupyterhub-dcr[synthesis]'`` (see docs/synthesis.md
for the one extra ``--no-deps`` step that keeps PyTorch out).

Modules:

- :mod:`dcr_provider.schema`: the declared table schema (YAML or JSON) and the types DCR understands.
- :mod:`dcr_provider.tables`: reading CSV and Parquet files strictly (errors name row and column), writing
  synthetic tables, and the schema-match check for a provider's own synthetic file.
- :mod:`dcr_provider.domain`: column domains (declared, or estimated with differential privacy), and the
  encoding of a table to and from the discrete codes the mechanisms work on.
- :mod:`dcr_provider.synthesizers`: the ``mst``, ``aim`` and ``random`` synthesizers and budget accounting.
- :mod:`dcr_provider.fidelity`: the fidelity report (provider-only from real data, or researcher-facing from
  differentially private statistics), as JSON and HTML.
"""
