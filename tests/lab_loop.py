"""A faithful transcription of the lab's training loop (TP 5, section 4.4), for comparison.

Only what the comparison needs changed: the two weight matrices come in as arguments, the number
of iterations is a parameter, and nothing is printed. The arithmetic is the lab's, line for line.
"""

import numpy as np


def sigmoid(z):
    sigmoid_f = 1 / (1 + np.exp(-z))
    return sigmoid_f


def sigmoid_derivate(z):
    sigm = sigmoid(z)
    return sigm * (1 - sigm)


def lab_train(X_train, Yhat, W1, W2, tau=0.2, lamb=0.0, iters=5000):
    n = X_train.shape[1]
    n2 = W1.shape[0]
    with np.errstate(over="ignore"):  # the lab silences these warnings globally
        for _ in range(iters):
            # forward pass
            Y1 = X_train
            Y1bias = np.insert(Y1, 0, 1, axis=0)
            Y2 = sigmoid(W1.dot(Y1bias))
            Y2bias = np.insert(Y2, 0, 1, axis=0)
            Y3 = sigmoid(W2.dot(Y2bias))

            # backward pass
            Delta3 = Y3 - Yhat
            Grad2 = 1 / n * Delta3.dot(Y2bias.T)
            Grad2 += 2 * lamb * W2
            W2 = W2 - tau * Grad2
            W2bar = W2[:, 1 : n2 + 1]
            Delta2 = (W2bar.T.dot(Delta3)) * sigmoid_derivate(Y2)
            Grad1 = 1 / n * Delta2.dot(Y1bias.T)
            Grad1 += 2 * lamb * W1
            W1 = W1 - tau * Grad1
    return W1, W2
