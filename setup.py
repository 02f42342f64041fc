import re

from setuptools import find_packages, setup

# The version lives in one place: plexagent/__init__.py (read as text, so
# that installing needs none of the package's dependencies).
with open("plexagent/__init__.py", encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M).group(1)

setup(
    name="plexagent",
    version=VERSION,
    description="Node agent: the Local Node API and the Node Agent API in one Twisted daemon",
    python_requires=">=3.11",
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/plexagent_plugin.py"], "plexagent": ["http/openapi/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "twisted[tls]>=23.10",
        "klein>=23.5",
        "treq>=23.11",
        "docker>=7.0",
        "multipart>=1.0",
        "pyopenssl>=23.0",
        "service-identity>=21.1",
        "cryptography>=41",
        "attrs>=23.1",
        "croniter>=2.0",
        "psutil>=5.9",
        "prometheus_client>=0.19",
        "pyyaml>=6.0",
    ],
    extras_require={
        "test": [
            "hypothesis>=6.90",
            "mypy>=1.8",
            "mypy-zope>=1.0",
            "openapi-core>=0.23",
            "openapi-spec-validator>=0.7",
            "schemathesis>=4.0",
            "ruff>=0.6",
        ],
    },
    entry_points={"console_scripts": ["plexagent = plexagent.cli:main"]},
)
