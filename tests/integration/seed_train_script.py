"""A training script in the shape of SINGA's PEFT example ``examples/train.py`` (the seed).

Written for the tests (nothing of the seed is copied): the same functions (``run`` trains
the plain model, then ``peft`` wraps it with ``LinearLoraConfig(8, 1, 0., ["linear1",
"linear2"])`` and trains again, then merges and unmerges), the same signatures and the
same sequence of SINGA calls. Only its peftcore import differs from a seed script
(``from singa_peft import ...`` there). The data is synthetic (the seed downloads MNIST)
and the models are small ones shaped as the seed's ``mlp`` and ``cnn``.

The seed's ``__main__`` block reads ``args.precision``, which its parser never defines,
so the seed's script itself stops there; here ``run`` is called directly, as that block
would call it.
"""

import time

import numpy as np
from singa import device, layer, model, opt, tensor

from peftcore.singa_peft import LinearLoraConfig, get_peft_model

np_dtype = {"float16": np.float16, "float32": np.float32}
singa_dtype = {"float16": tensor.float16, "float32": tensor.float32}


class _Classifier(model.Model):
    def __init__(self):
        super().__init__()
        self.softmax_cross_entropy = layer.SoftMaxCrossEntropy()

    def train_one_batch(self, x, y, dist_option, spars):
        out = self.forward(x)
        loss = self.softmax_cross_entropy(out, y)
        if dist_option != "plain":
            raise ValueError(f"this script runs on one device (dist_option='plain'), not {dist_option!r}")
        self.optimizer(loss)
        return out, loss

    def set_optimizer(self, optimizer):
        self.optimizer = optimizer


class MLP(_Classifier):
    def __init__(self, in_features=10, perceptron_size=100, num_classes=10):
        super().__init__()
        self.dimension = 2
        self.relu = layer.ReLU()
        self.linear1 = layer.Linear(in_features, perceptron_size, bias=True)
        self.linear2 = layer.Linear(perceptron_size, num_classes, bias=True)

    def forward(self, inputs):
        return self.linear2(self.relu(self.linear1(inputs)))


class CNN(_Classifier):
    def __init__(self, num_classes=10, num_channels=1):
        super().__init__()
        self.dimension, self.input_size = 4, 28
        self.conv1 = layer.Conv2d(num_channels, 20, 5, padding=0, activation="RELU")
        self.conv2 = layer.Conv2d(20, 50, 5, padding=0, activation="RELU")
        self.pooling1 = layer.MaxPool2d(2, 2, padding=0)
        self.pooling2 = layer.MaxPool2d(2, 2, padding=0)
        self.flatten = layer.Flatten()
        self.linear1 = layer.Linear(500)
        self.relu = layer.ReLU()
        self.linear2 = layer.Linear(num_classes)

    def forward(self, x):
        y = self.pooling2(self.conv2(self.pooling1(self.conv1(x))))
        return self.linear2(self.relu(self.linear1(self.flatten(y))))


def load_synthetic(model_name, num_train=48, num_val=16, num_classes=4):
    """Learnable synthetic data: the class is the argmax of a fixed projection."""
    rng = np.random.default_rng(1)
    shape = (1, 28, 28) if model_name == "cnn" else (1, 4, 5)
    x = rng.random((num_train + num_val, *shape), dtype=np.float32)
    projection = rng.standard_normal((int(np.prod(shape)), num_classes)).astype(np.float32)
    y = np.argmax(x.reshape(len(x), -1) @ projection, axis=1).astype(np.int32)
    return x[:num_train], y[:num_train], x[num_train:], y[num_train:]


def augmentation(x, batch_size):
    xpad = np.pad(x, [[0, 0], [0, 0], [4, 4], [4, 4]], "symmetric")
    for n in range(batch_size):
        offset = np.random.randint(8, size=2)
        x[n] = xpad[n, :, offset[0] : offset[0] + x.shape[2], offset[1] : offset[1] + x.shape[3]]
        if np.random.randint(2):
            x[n] = x[n, :, :, ::-1]
    return x


def accuracy(pred, target):
    return int((np.argmax(pred, axis=1) == target).sum())


def _data(model_name, batch_size, precision):
    train_x, train_y, val_x, val_y = load_synthetic(model_name)
    data_size = int(np.prod(train_x.shape[1:]))
    if model_name == "mlp":
        train_x, val_x = train_x.reshape(len(train_x), -1), val_x.reshape(len(val_x), -1)
    return train_x, train_y, val_x, val_y, data_size


def _placeholders(net, batch_size, data_size, train_x, dev, precision):
    if net.dimension == 4:
        tx = tensor.Tensor((batch_size, train_x.shape[1], net.input_size, net.input_size), dev, singa_dtype[precision])
    else:
        tx = tensor.Tensor((batch_size, data_size), dev, singa_dtype[precision])
    return tx, tensor.Tensor((batch_size,), dev, tensor.int32)


def _epochs(net, max_epoch, batch_size, train_x, train_y, val_x, val_y, tx, ty, dist_option, spars, precision):
    idx = np.arange(train_x.shape[0], dtype=np.int32)
    for epoch in range(max_epoch):
        start_time = time.time()
        np.random.shuffle(idx)
        print("Starting Epoch %d:" % epoch)
        train_correct, train_loss, test_correct = 0, 0.0, 0
        net.train()
        for b in range(train_x.shape[0] // batch_size):
            x = train_x[idx[b * batch_size : (b + 1) * batch_size]]
            if net.dimension == 4:
                x = augmentation(x.copy(), batch_size)
            tx.copy_from_numpy(x.astype(np_dtype[precision]))
            y = train_y[idx[b * batch_size : (b + 1) * batch_size]]
            ty.copy_from_numpy(y)
            out, loss = net(tx, ty, dist_option, spars)
            train_correct += accuracy(tensor.to_numpy(out), y)
            train_loss += float(tensor.to_numpy(loss)[0])
        print("Training loss = %.2f, training accuracy = %.2f %%" % (train_loss, 100.0 * train_correct / len(train_x)))
        net.eval()
        for b in range(val_x.shape[0] // batch_size):
            tx.copy_from_numpy(val_x[b * batch_size : (b + 1) * batch_size].astype(np_dtype[precision]))
            out_test = net(tx)
            test_correct += accuracy(tensor.to_numpy(out_test), val_y[b * batch_size : (b + 1) * batch_size])
        print("Evaluation accuracy = %.2f %%, Elapsed Time = %fs" % (100.0 * test_correct / len(val_x), time.time() - start_time))


def run(global_rank, world_size, local_rank, max_epoch, batch_size, model, data, dir_path, sgd, graph, verbosity,
        dist_option="plain", spars=None, peft_type="None", precision="float32"):
    dev = device.get_default_device()
    dev.SetRandSeed(0)
    np.random.seed(0)
    if data != "synthetic":
        raise ValueError(f"Not support dataset {data}")
    model_name = model
    train_x, train_y, val_x, val_y, data_size = _data(model_name, batch_size, precision)
    num_classes = int(np.max(train_y) + 1)
    if model_name == "mlp":
        model = MLP(in_features=data_size, perceptron_size=16, num_classes=num_classes)
    elif model_name == "cnn":
        model = CNN(num_classes=num_classes, num_channels=train_x.shape[1])
    else:
        raise ValueError(f"Not support model {model_name}")
    tx, ty = _placeholders(model, batch_size, data_size, train_x, dev, precision)
    model.set_optimizer(sgd)
    model.compile([tx], is_train=True, use_graph=False, sequential=False)
    dev.SetVerbosity(verbosity)
    _epochs(model, max_epoch, batch_size, train_x, train_y, val_x, val_y, tx, ty, dist_option, spars, precision)
    return peft(global_rank, world_size, local_rank, max_epoch, batch_size, model, data, dir_path, sgd, graph,
                verbosity, dist_option, spars, peft_type, precision)


def peft(global_rank, world_size, local_rank, max_epoch, batch_size, model, data, dir_path, sgd, graph, verbosity,
         dist_option="plain", spars=None, peft_type="None", precision="float32"):
    dev = device.get_default_device()
    dev.SetRandSeed(0)
    np.random.seed(0)
    model_name = "cnn" if model.dimension == 4 else "mlp"
    train_x, train_y, val_x, val_y, data_size = _data(model_name, batch_size, precision)
    tx, ty = _placeholders(model, batch_size, data_size, train_x, dev, precision)
    peft_model = model
    if peft_type == "linear_lora":
        config = LinearLoraConfig(8, 1, 0., ["linear1", "linear2"])
        peft_model = get_peft_model(model, config)
    peft_model.set_optimizer(sgd)
    peft_model.compile([tx], is_train=True, use_graph=graph, sequential=False)
    dev.SetVerbosity(verbosity)
    _epochs(peft_model, max_epoch, batch_size, train_x, train_y, val_x, val_y, tx, ty, dist_option, spars, precision)
    # for inference, merge the weights; unmerge them to train again
    peft_model.merge_weights(mode=True)
    print("after merge weights.")
    merged = {k: tensor.to_numpy(v).copy() for k, v in peft_model.get_params().items()}
    peft_model.merge_weights(mode=False)
    print("after unmerge weights.")
    return peft_model, merged


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Training using the autograd and graph.")
    parser.add_argument("model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("peft", choices=["None", "linear_lora"], default="None")
    parser.add_argument("-m", "--max-epoch", default=2, type=int, dest="max_epoch")
    parser.add_argument("-b", "--batch-size", default=8, type=int, dest="batch_size")
    parser.add_argument("-l", "--learning-rate", default=0.01, type=float, dest="lr")
    parser.add_argument("-g", "--disable-graph", default=True, action="store_false", dest="graph")
    parser.add_argument("-p", "--precision", default="float32", choices=["float32"], dest="precision")  # the seed lacks it
    args = parser.parse_args()
    sgd = opt.SGD(lr=args.lr, momentum=0.9, weight_decay=1e-5, dtype=singa_dtype[args.precision])
    run(0, 1, 0, args.max_epoch, args.batch_size, args.model, "synthetic", None, sgd, args.graph, 0,
        peft_type=args.peft, precision=args.precision)
