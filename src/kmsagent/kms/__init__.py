"""The KMS client: what the rest of the agent uses of KMS (it knows no cache).

- `client.py`: `KmsClient` — GetSecretValue and BatchGetSecretValue with retries, back-off, the
  MaxConcurrentRequests bound and endpoint fallback;
- `endpoints.py`: which endpoint a call goes to (the primary, or a replica while it fails);
- `wire.py`: one signed call and the meaning of its answer.
"""

from kmsagent.kms.client import KmsClient
from kmsagent.kms.wire import BATCH_LIMIT, MAX_ANSWER_BYTES, SecretValue

__all__ = ["BATCH_LIMIT", "MAX_ANSWER_BYTES", "KmsClient", "SecretValue"]
