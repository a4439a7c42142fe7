"""The two search stages (kernel, schedule): where candidates come
from and how they are evaluated."""
