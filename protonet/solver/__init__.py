"""Training: Caffe's solvers (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam) on torch."""
from .solver import (SOLVERS, AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver,
                     RMSPropSolver, SGDSolver, Solver, get_solver)

__all__ = ["SOLVERS", "AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "NesterovSolver",
           "RMSPropSolver", "SGDSolver", "Solver", "get_solver"]
