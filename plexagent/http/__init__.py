"""
Shared HTTP plumbing: the site and channel, listener policies, JSON bodies
and limits, streamed bodies, OpenAPI documents. Imports no domain module.
"""
