import os; os.environ["TRITON_INTERPRET"]="1"
import torch, sys
sys.path.insert(0,'/tmp/audit')
from refs import *
import vitkernels as vk
vk.set_backend('triton')
torch.manual_seed(0)
def rel(a,b): return ((a.double()-b.double()).abs().max()/(b.double().abs().max()+1e-12)).item()
# odd head dims & N
for D in [48,80]:
    q=torch.randn(1,2,50,D); o=vk.attention(q,q,q); print("D",D,rel(o,attn_ref(q.double(),q.double(),q.double())))
# non-contiguous
q=torch.randn(1,9,2,32).transpose(1,2); b=torch.randn(9)[None,None,None].expand(1,2,9,9)
print("transposed q + expanded bias", rel(vk.attention(q,q,q,b),attn_ref(q.double(),q.double(),q.double(),b.double())))
qkv=torch.randn(1,12,200)[...,:96]
print("sliced qkv self", rel(vk.self_attention(qkv,2),self_attn_ref(qkv.double(),2)))
print("sliced qkv window", rel(vk.window_attention(qkv,(3,4),2,2,1),window_ref(qkv.double(),(3,4),2,2,1)))
print("sliced qkv xca", rel(vk.xca(qkv,2,torch.ones(2)),xca_ref(qkv.double(),2,torch.ones(2).double())))
print("sliced st", rel(vk.space_time_attention(qkv,3,2,'time',layout='ts'),st_ref(qkv.double(),3,2,'time',None,'ts')[0]))
x=torch.randn(1,8,20).transpose(1,2); w=torch.randn(8,1,3,3)
print("transposed x dwconv", rel(vk.dwconv(x,(4,5),w),dwconv_ref(x.double(),(4,5),w.double())))
qb=torch.randn(1,5,16).transpose(1,2)[:, :, :]  # (1,16,5)? make q (B,N,C) non-contig
q=torch.randn(1,8,13).transpose(1,2); kv=torch.randn(1,16,5).transpose(1,2)
print("noncontig sr", rel(vk.sr_attention(q,kv,2),sr_ref(q.double(),kv.double(),2)))
# fully masked
q=torch.randn(1,2,4,16,requires_grad=True); b=torch.zeros(1,2,4,5); b[:,:,1]=float('-inf'); k=torch.randn(1,2,5,16,requires_grad=True)
o=vk.attention(q,k,k,b); o.sum().backward(); print("masked row", o[0,:,1].abs().max().item(), torch.isfinite(q.grad).all().item(), torch.isfinite(k.grad).all().item())
# empty batch
for name,fn in [("attn",lambda: vk.attention(torch.randn(0,2,3,16),torch.randn(0,2,3,16),torch.randn(0,2,3,16))),
                ("win",lambda: vk.window_attention(torch.randn(0,16,24),(4,4),2,2,1,torch.randn(9,2))),
                ("xca",lambda: vk.xca(torch.randn(0,5,24),2,torch.ones(2,1,1))),
                ("dw",lambda: vk.dwconv(torch.randn(0,6,4),(2,3),torch.randn(4,1,3,3)))]:
    try: print("empty",name,tuple(fn().shape))
    except Exception as e: print("empty",name,"RAISES",type(e).__name__,str(e)[:200])
# NaN poison: are outputs fully written? compare two runs with large shapes
q=torch.randn(2,3,70,32); print("N=70 three heads", rel(vk.attention(q,q,q),attn_ref(q.double(),q.double(),q.double())))
# dwconv C not multiple of block
x=torch.randn(2,35,37); w=torch.randn(37,1,3,3); print("dw C=37", rel(vk.dwconv(x,(5,7),w,None,'gelu'),dwconv_ref(x.double(),(5,7),w.double(),None,'gelu')))
# window large-ish: swin like 14x14 M7 s3 heads 3 D32
qkv=torch.randn(1,196,288); t=torch.randn(169,3); qb=torch.randn(288)
print("swin 14x14", rel(vk.window_attention(qkv,(14,14),3,7,3,t,qb),window_ref(qkv.double(),(14,14),3,7,3,t.double(),qb.double())))
qkv=torch.randn(1,13*11,96)
print("window 13x11 M7 s3", rel(vk.window_attention(qkv,(13,11),1,7,3,torch.randn(169,1),torch.randn(96)),None) if False else "")
