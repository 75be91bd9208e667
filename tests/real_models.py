"""Models written the way the codebases people train from write them (not for kfac_func): the minimal GPT as
the well-known minimal GPT repositories write it (:class:`kfac_func.models.GPT`, re-exported), PyTorch's own
examples (the word language model's sequence-first ``nn.Transformer`` model and its LSTM taking ``(input,
hidden)``, the VAE), a GPT in the other well-known minimal layout (:class:`HandAttentionGPT`), and a GPT-2
block with Hugging Face's ``Conv1D`` (``addmm`` with an ``(in, out)`` weight). Small sizes, so that dense
float64 oracles are cheap."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kfac_func.models import GPT  # noqa: F401  (re-exported for the tests)


class PositionalEncoding(nn.Module):
    def __init__(self, d_model, dropout=0.0, max_len=64):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0).transpose(0, 1))

    def forward(self, x):
        return self.dropout(x + self.pe[: x.size(0), :])


class TransformerModel(nn.Transformer):
    """PyTorch's word language model: sequence-first ``(T, N)`` ids, ``nn.TransformerEncoder`` (batch_first
    left at False), a causal mask built in the forward, ``log_softmax`` out ``(T, N, V)``."""

    def __init__(self, ntoken=11, ninp=8, nhead=2, nhid=12, nlayers=1, dropout=0.0):
        super().__init__(d_model=ninp, nhead=nhead, dim_feedforward=nhid, num_encoder_layers=nlayers,
                         num_decoder_layers=1, dropout=dropout)
        self.src_mask = None
        self.pos_encoder = PositionalEncoding(ninp, dropout)
        self.input_emb = nn.Embedding(ntoken, ninp)
        self.ninp = ninp
        self.decoder = nn.Linear(ninp, ntoken)

    def forward(self, src, has_mask=True):
        if has_mask:
            if self.src_mask is None or self.src_mask.size(0) != len(src):
                self.src_mask = nn.Transformer.generate_square_subsequent_mask(len(src)).to(src.device)
        else:
            self.src_mask = None
        src = self.input_emb(src) * math.sqrt(self.ninp)
        src = self.pos_encoder(src)
        output = self.encoder(src, mask=self.src_mask)
        output = self.decoder(output)
        return F.log_softmax(output, dim=-1)


class RNNModel(nn.Module):
    """PyTorch's word language model, LSTM flavour: ``forward(input, hidden)`` on sequence-first ids, returns
    ``(decoded.view(-1, ntoken), hidden)``."""

    def __init__(self, ntoken=11, ninp=8, nhid=8, nlayers=1, dropout=0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.ntoken, self.nhid, self.nlayers = ntoken, nhid, nlayers

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``: a dense layer with its weight stored ``(in, out)``, applied by ``addmm``
    on the flattened rows."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.2)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Conv1DNet(nn.Module):
    """Token embeddings → Conv1D MLP (c_fc, gelu, c_proj) with a residual → LayerNorm → head."""

    def __init__(self, vocab=11, n_embd=6):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.c_fc = Conv1D(2 * n_embd, n_embd)
        self.c_proj = Conv1D(n_embd, 2 * n_embd)
        self.ln = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab)

    def forward(self, ids):
        x = self.wte(ids)
        x = x + self.c_proj(F.gelu(self.c_fc(x)))
        return self.head(self.ln(x))


class VAE(nn.Module):
    """PyTorch's VAE example (smaller): ``randn_like`` in the reparametrisation, ``(recon, mu, logvar)`` out; its
    loss is the user's own (binary cross-entropy of the reconstruction plus the KL term, summed)."""

    def __init__(self, d=12, hidden=8, z=2):
        super().__init__()
        self.d = d
        self.fc1 = nn.Linear(d, hidden)
        self.fc21 = nn.Linear(hidden, z)
        self.fc22 = nn.Linear(hidden, z)
        self.fc3 = nn.Linear(z, hidden)
        self.fc4 = nn.Linear(hidden, d)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, self.d))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def vae_loss(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, recon_x.shape[-1]), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


class GraphConv(nn.Module):
    """PyTorch's GCN example's layer: ``torch.mm(x, kernel)`` with a ``(in, out)`` kernel, then
    ``torch.spmm(adj, support)`` over the whole graph, and the bias added."""

    def __init__(self, input_dim, output_dim, use_bias=False):
        super().__init__()
        self.kernel = nn.Parameter(torch.Tensor(input_dim, output_dim))
        nn.init.xavier_normal_(self.kernel)
        self.bias = None
        if use_bias:
            self.bias = nn.Parameter(torch.Tensor(output_dim))
            nn.init.zeros_(self.bias)

    def forward(self, input_tensor, adj_mat):
        support = torch.mm(input_tensor, self.kernel)
        output = torch.spmm(adj_mat, support)
        if self.bias is not None:
            output = output + self.bias
        return output


class GCN(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, use_bias=True, dropout_p=0.1):
        super().__init__()
        self.gc1 = GraphConv(input_dim, hidden_dim, use_bias=use_bias)
        self.gc2 = GraphConv(hidden_dim, output_dim, use_bias=use_bias)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, input_tensor, adj_mat):
        x = self.gc1(input_tensor, adj_mat)
        x = F.relu(x)
        x = self.dropout(x)
        x = self.gc2(x, adj_mat)
        return F.log_softmax(x, dim=1)


class TanhGELU(nn.Module):
    """GPT-2's tanh approximation of GELU, written out with ``math.sqrt`` and ``torch.pow``."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class HandAttention(nn.Module):
    """Causal self-attention by hand: one packed ``c_attn`` split into q, k, v, the scores masked with a
    lower-triangular buffer named ``bias`` (a buffer, not a parameter), softmax, dropout on the weights."""

    def __init__(self, dim: int, heads: int, block_size: int, dropout: float):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.attn_dropout, self.resid_dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))
        self.heads, self.dim = heads, dim

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.dim, dim=2)
        k, q, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (k, q, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class HandAttentionBlock(nn.Module):
    """A pre-LayerNorm block whose MLP lives in an ``nn.ModuleDict`` and runs through a lambda (``mlpf``)."""

    def __init__(self, dim: int, heads: int, block_size: int, dropout: float):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = HandAttention(dim, heads, block_size, dropout)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(dim, 4 * dim), c_proj=nn.Linear(4 * dim, dim), act=TanhGELU(),
                                      dropout=nn.Dropout(dropout)))
        m = self.mlp
        self.mlpf = lambda x: m.dropout(m.c_proj(m.act(m.c_fc(x))))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlpf(self.ln_2(x))


class HandAttentionGPT(nn.Module):
    """A GPT laid out the other well-known minimal way: ``transformer`` an ``nn.ModuleDict`` (``wte``, ``wpe``,
    ``drop``, ``h``, ``ln_f``), an untied ``lm_head`` without bias, position ids ``(1, T)``, and ``forward(idx,
    targets=None)`` returning ``(logits, loss)`` with the loss ignoring targets ``-1``."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 2, n_head: int = 2, n_embd: int = 8,
                 dropout: float = 0.0):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd), drop=nn.Dropout(dropout),
            h=nn.ModuleList([HandAttentionBlock(n_embd, n_head, block_size, dropout) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device).unsqueeze(0)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss
